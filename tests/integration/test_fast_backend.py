"""The queue backends side by side (README: Queue backends): the same encrypted transfer on
NetfilterQueue and on our own netlink binding, and a pass-through with GSO super-packets.

The rest of the integration suite runs once per backend (conftest.py); these cases name their
backends themselves (`own_backend`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from nfq_tcpcrypt.lab.net import Topology, http_transfer, shell_faults, start_daemon
from nfq_tcpcrypt.shell.control import query

SIZE = 4 * 1024 * 1024
pytestmark = pytest.mark.own_backend


@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend", ["netfilterqueue", "fast"])
def test_encrypted_transfer_on_each_backend(topo: Topology, tmp_path: Path, backend: str) -> None:
    """RFC 8548 §4.3 and §4.2 through either binding: same bytes, no plaintext, one session ID."""
    args = ["--queue-backend", backend]
    result = http_transfer(topo, tmp_path, size=SIZE, daemon_args={"a": args, "b": args})
    assert result.received_sha256 == result.sent_sha256
    assert result.wire.syn_has_eno and result.wire.synack_has_eno
    assert result.wire.leaks == {}, result.wire.leaks
    assert len(result.wire.server_stream) > SIZE
    a, b = result.session_for("a"), result.session_for("b")
    assert a is not None and b is not None and a["session_id"] == b["session_id"]
    for side in ("a", "b"):
        counters = result.counters[side]
        assert shell_faults(counters) == {}, (side, counters)
        handled = counters.get("shell.packets_inbound", 0) + counters.get("shell.packets_outbound", 0)
        # GSO is on under the engine on the fast backend: super-packets, far fewer of them
        assert handled > (100 if backend == "fast" else 1000), (side, counters)
        if backend == "fast":
            assert counters["shell.queue_recv_calls"] >= handled
            assert counters["shell.queue_enobufs"] == 0 and counters["shell.queue_verdict_errors"] == 0
            # verdicts go in batches: fewer sendmsg calls than packets
            assert 0 < counters["shell.queue_verdict_sends"] < handled, counters
        else:
            assert "shell.queue_recv_calls" not in counters
    for daemon in result.daemons.values():
        assert daemon.proc.returncode == 0


@pytest.mark.timeout(300)
def test_pass_through_takes_gso_super_packets(topo: Topology, tmp_path: Path) -> None:
    """With NFQA_CFG_F_GSO the sender's queue sees super-packets larger than the link MTU, with
    their checksum not filled in, and accepts them whole; the kernel segments them after the verdict."""
    args = ["--pass-through", "--queue-backend", "fast", "--queue-gso"]
    result = http_transfer(topo, tmp_path, size=SIZE, daemon_args={"a": args, "b": args})
    assert result.received_sha256 == result.sent_sha256
    sender = result.counters["b"]  # the HTTP server sends the file
    assert sender.get("shell.gso_packets", 0) > 0, sender
    assert sender.get("shell.csum_not_ready", 0) > 0, sender
    assert shell_faults(sender) == {}
    # super-packets: far fewer queued data packets than MTU-sized segments of the file
    assert sender["shell.packets_outbound"] < SIZE // 1448 // 2, sender


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [1, 2])
def test_status_names_the_backend(topo: Topology, tmp_path: Path, workers: int) -> None:
    """`status` (JSON and text) says which binding the queues are on, with one worker and with several."""
    daemon = start_daemon(topo, "a", tmp_path, ["--queue-backend", "fast", "--workers", str(workers)])
    try:
        doc = query(daemon.control, "status")
        assert doc["queue_backend"] == "fast" and doc["queue_gso"] is True and doc["workers"] == workers
        text = subprocess.run([sys.executable, "-m", "nfq_tcpcrypt", "status", "--control", daemon.control],
                              capture_output=True, text=True, timeout=30, check=True).stdout  # fmt: skip
        assert "(fast, GSO)" in text.splitlines()[0], text
    finally:
        assert daemon.stop() == 0
