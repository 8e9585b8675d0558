"""Host mode end to end between two namespaces with real programs."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

from nfq_tcpcrypt.lab.net import (
    KEYLOG_ES,
    Topology,
    backend_args,
    fetch,
    http_server,
    http_transfer,
    make_payload,
    sha256_file,
    shell_faults,
    start_daemon,
)

SIZE = 4 * 1024 * 1024


def _rule_lines(topo: Topology, side: str) -> list[str]:
    save = topo.run(side, ["iptables-save"], timeout=30)
    assert save.returncode == 0, save.stderr
    return [line for line in save.stdout.splitlines() if "NFQ_TCPCRYPT" in line or "NFQUEUE" in line]


@pytest.mark.timeout(240)
def test_http_transfer_encrypted(topo: Topology, tmp_path: Path) -> None:
    """RFC 8547 §4 ENO in SYN/SYN-ACK, RFC 8548 §4.3 Init1/Init2 first, no plaintext, equal session IDs."""
    result = http_transfer(topo, tmp_path, size=SIZE)
    wire = result.wire

    assert result.received_sha256 == result.sent_sha256
    assert result.capture is not None and result.capture.dropped == 0, result.capture
    assert wire.syn_has_eno, "no ENO option (kind 69) in the SYN"
    assert wire.synack_has_eno, "no ENO option (kind 69) in the SYN-ACK"
    assert wire.client_stream[:4].hex() == "15101a0e", "A->B stream does not start with Init1"
    assert wire.server_stream[:4].hex() == "097105e0", "B->A stream does not start with Init2"
    assert wire.leaks == {}, f"plaintext on the wire: {wire.leaks}"
    assert len(wire.server_stream) > SIZE, (len(wire.server_stream), result.capture)

    a, b = result.session_for("a"), result.session_for("b")
    assert a is not None and b is not None, result.sessions
    assert re.fullmatch(r"[0-9a-f]{66}", a["session_id"]), a
    assert a["session_id"] == b["session_id"]
    for entry in (a, b):
        assert entry["tep"] == "x25519"
        assert entry["aead"] == "aes128gcm"
        assert entry["resumed"] is False
    assert a["local"] == b["remote"] and a["remote"] == b["local"]

    for side, text in result.keylogs.items():
        assert text.startswith("# nfq-tcpcrypt key log\n"), side
        assert KEYLOG_ES.search(text), f"no ES line in the key log of {side}: {text!r}"
        assert os.stat(result.daemons[side].keylog).st_mode & 0o777 == 0o600
    assert set(result.keylogs) == {"a", "b"}
    for side, daemon in result.daemons.items():
        assert daemon.proc.returncode == 0, Path(daemon.log).read_text()[-2000:]
        assert shell_faults(result.counters[side]) == {}, Path(daemon.log).read_text()[-3000:]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("daemon_side", ["a", "b"])
def test_plain_peer_still_works(topo: Topology, tmp_path: Path, daemon_side: str) -> None:
    """RFC 8547 §4.6: a peer without ENO gets plain TCP, and the transfer still succeeds."""
    result = http_transfer(topo, tmp_path, size=SIZE, daemon_sides=[daemon_side])
    wire = result.wire

    assert result.received_sha256 == result.sent_sha256
    assert not wire.client_starts_with_init1 and not wire.server_starts_with_init2
    assert not (wire.syn_has_eno and wire.synack_has_eno)
    # The same checks that prove encryption must see the plaintext here, or they prove nothing.
    assert "http-status-line" in wire.leaks and any(name.startswith("marker") for name in wire.leaks)
    assert result.session_for(daemon_side) is None or result.session_for(daemon_side)["tep"] in (None, "")
    assert result.daemons[daemon_side].proc.returncode == 0
    assert shell_faults(result.counters[daemon_side]) == {}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fail_closed", [False, True])
def test_sigterm_removes_rules(topo: Topology, tmp_path: Path, fail_closed: bool) -> None:
    """docs/architecture.md: the daemon installs its chains and removes exactly them on SIGTERM."""
    before = _rule_lines(topo, "a")
    assert before == []
    daemon = start_daemon(topo, "a", tmp_path, ["--fail-closed"] if fail_closed else [])
    lines = _rule_lines(topo, "a")
    queue_rules = [line for line in lines if "NFQUEUE" in line]
    assert any("NFQ_TCPCRYPT" in line and line.startswith("-A PREROUTING") for line in lines), lines
    assert any("NFQ_TCPCRYPT" in line and line.startswith("-A POSTROUTING") for line in lines), lines
    assert any("--notrack" in line for line in lines), lines
    assert len(queue_rules) == 3
    # Encrypted connections' packets never bypass the queue (README: Security model).
    assert all(("--queue-bypass" in line) != (fail_closed or "ENCQ" in line) for line in queue_rules), queue_rules

    assert daemon.stop(timeout=20) == 0, Path(daemon.log).read_text()[-2000:]
    assert _rule_lines(topo, "a") == []
    assert not os.path.exists(daemon.control)


@pytest.mark.timeout(120)
def test_startup_failure_removes_its_rules(topo: Topology, tmp_path: Path) -> None:
    """A daemon that fails after installing its rules (control socket taken) removes exactly its own."""
    first = start_daemon(topo, "a", tmp_path)
    mine = _rule_lines(topo, "a")
    second = topo.run(
        "a",
        [sys.executable, "-m", "nfq_tcpcrypt", "run", "--mode", "host", "--queue-num", "7200",
         *backend_args(), "--control", first.control],
        timeout=30,
    )  # fmt: skip
    assert second.returncode != 0
    assert "another daemon answers" in second.stderr
    assert _rule_lines(topo, "a") == mine, "the failed daemon left rules or removed the other's"
    assert first.stop() == 0
    assert _rule_lines(topo, "a") == []


@pytest.mark.timeout(180)
def test_http_transfer_encrypted_ipv6(topo: Topology, tmp_path: Path) -> None:
    """The same end-to-end checks over IPv6 (fd77::1 <-> fd77::2) with `run --ipv6` (ip6tables rules)."""
    result = http_transfer(topo, tmp_path, size=1024 * 1024, ipv6=True)
    wire = result.wire
    assert result.received_sha256 == result.sent_sha256
    assert wire.syn_has_eno and wire.synack_has_eno
    assert wire.client_starts_with_init1 and wire.server_starts_with_init2
    assert wire.leaks == {}, f"plaintext on the wire: {wire.leaks}"
    a, b = result.session_for("a"), result.session_for("b")
    assert a is not None and b is not None, result.sessions
    assert a["session_id"] == b["session_id"] and a["local"].startswith("[fd77::1]:")
    for side, daemon in result.daemons.items():
        assert daemon.proc.returncode == 0, Path(daemon.log).read_text()[-2000:]
        assert shell_faults(result.counters[side]) == {}, Path(daemon.log).read_text()[-3000:]


@pytest.mark.timeout(150)
def test_http_transfer_survives_wire_loss(topo: Topology, tmp_path: Path) -> None:
    """2% of arriving wire packets dropped on both ends; TCP recovers, bytes stay equal."""
    result = http_transfer(topo, tmp_path, size=SIZE, timeout=90, wire_loss=0.02)
    assert result.received_sha256 == result.sent_sha256
    assert result.wire.leaks == {}
    for side, daemon in result.daemons.items():
        assert daemon.proc.returncode == 0
        assert shell_faults(result.counters[side]) == {}, Path(daemon.log).read_text()[-3000:]


@pytest.mark.timeout(120)
def test_rules_remove_after_sigkill(topo: Topology, tmp_path: Path) -> None:
    """A SIGKILLed daemon leaves its chains; `nfq-tcpcrypt rules remove` takes exactly them away."""
    daemon = start_daemon(topo, "a", tmp_path, ["--ipv6"])
    daemon.proc.kill()
    daemon.proc.wait(10)
    assert _rule_lines(topo, "a") != []
    cli = [sys.executable, "-m", "nfq_tcpcrypt"]
    removed = topo.run("a", [*cli, "rules", "remove", "--control", daemon.control], timeout=30)
    assert removed.returncode == 0, removed.stderr
    assert _rule_lines(topo, "a") == []
    assert topo.run("a", ["ip6tables-save"], timeout=30).stdout.count("NFQ_TCPCRYPT") == 0
    shown = topo.run("a", [*cli, "rules", "show"], timeout=30)
    assert shown.returncode == 0 and shown.stdout == ""


@pytest.mark.timeout(120)
def test_loopback_is_never_queued(topo: Topology, tmp_path: Path) -> None:
    """docs/architecture.md: TCP over lo bypasses the queues (its 64 KiB packets exceed the 4016-byte copy)."""
    daemon = start_daemon(topo, "a", tmp_path)
    served = tmp_path / "www"
    served.mkdir()
    make_payload(served / "f", 1024 * 1024)
    with http_server(topo, "a", served, address="127.0.0.1") as url:
        fetch(topo, "a", f"{url}/f", tmp_path / "got", timeout=30)
    assert sha256_file(tmp_path / "got") == sha256_file(served / "f")
    counters = daemon.counters()
    assert counters.get("shell.packets_inbound", 0) == 0, counters
    assert counters.get("shell.packets_outbound", 0) == 0, counters
    assert daemon.sessions() == []
    assert daemon.stop() == 0
