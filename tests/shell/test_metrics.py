"""Units of shell/metrics.py: event counting with bounded reasons, status, Prometheus text."""

from __future__ import annotations

import re

from nfq_tcpcrypt.core.events import FellBackToPlain, SessionAborted, SessionEstablished
from nfq_tcpcrypt.core.flow import FlowKey
from nfq_tcpcrypt.shell import metrics

FLOW = FlowKey(bytes(4), 1, bytes(4), 2)


def test_reasons_are_reduced_and_bounded() -> None:
    reason = metrics.reason_class("frame at offset 1234 failed authentication")
    assert reason == "frame at offset N failed authentication"
    assert metrics.reason_class("peer syn: bad length 7") == "peer syn"
    stats = metrics.EventStats()
    for n in range(200):  # a peer that makes up reasons cannot grow the table
        stats.observe(FellBackToPlain(FLOW, f"reason{'x' * n}: detail"))
    assert len([k for k in stats.counters if k.startswith(metrics.FALLBACK)]) == metrics.MAX_REASONS + 1
    assert stats.counters["fallback:other"] == 200 - metrics.MAX_REASONS


def test_status_and_prometheus() -> None:
    stats = metrics.EventStats()
    stats.observe(SessionEstablished(FLOW, "23" * 33, "aes128gcm", False))
    stats.observe(SessionEstablished(FLOW, "a3" * 33, "aes128gcm", True))
    stats.observe(SessionAborted(FLOW, "frame at offset 99 failed authentication"))
    stats.observe(FellBackToPlain(FLOW, 'syn "retransmitted" without eno'))
    counters = {**stats.counters, "kernel.queue7100.queue_dropped": 3, "kernel.queue7100.user_dropped": 1,
                "sessions": 2, "packets": 10}  # fmt: skip
    doc = metrics.status(counters, {"mode": "host", "workers": 1, "rules": ["ipv4: -A X"]})
    assert doc["handshakes"] == {"fresh": 1, "resumed": 1} and doc["tag_failures"] == 1
    assert doc["aborts"] == {"frame at offset N failed authentication": 1}
    assert doc["kernel_queue_drops"] == 4 and doc["sessions"] == 2
    text = metrics.prometheus(doc)
    assert 'nfq_tcpcrypt_connections_total{outcome="encrypted"} 2' in text
    assert 'nfq_tcpcrypt_connections_total{outcome="plain_fallback"} 1' in text
    assert 'nfq_tcpcrypt_fallbacks_total{reason="syn \\"retransmitted\\" without eno"} 1' in text
    assert 'nfq_tcpcrypt_kernel_queue_drops_total{queue="7100",kind="queue_dropped"} 3' in text
    assert 'nfq_tcpcrypt_events_total{name="packets"} 10' in text
    assert 'name="sessions"' not in text and 'name="handshakes_fresh"' not in text  # own metrics
    for line in text.splitlines():
        assert line.startswith("# ") or re.fullmatch(r"nfq_tcpcrypt_\w+(\{.*\})? \d+", line), line


def test_textfile_is_replaced_atomically(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "m.prom"
    metrics.write_textfile(str(path), "a 1\n")
    metrics.write_textfile(str(path), "a 2\n")
    assert path.read_text() == "a 2\n" and [p.name for p in tmp_path.iterdir()] == ["m.prom"]
