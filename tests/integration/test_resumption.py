"""Session resumption end to end (RFC 8548 §3.5; README: Resumption and cloned machines).

Two daemons, one http.server in b, curl run several times from a (separate TCP connections), each
under its own capture: the first connection does the full key exchange, the second resumes it
(resume suboptions in SYN and SYN-ACK, no Init1/Init2), and after `nfq-tcpcrypt cache flush` on
the client the next one is fresh again.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from nfq_tcpcrypt.lab.net import Daemon, Topology, sha256_file
from nfq_tcpcrypt.tools.decode import ConnectionReport, decode_pcap, render_text

from .test_protocol import (
    Fetched,
    assert_encrypted_wire,
    assert_no_faults,
    daemons,
    fetch_captured,
    http_sessions,
    serving,
)

SMALL = 256 * 1024
RESUME_TEP_BYTE = 0xA3  # X25519 (0x23) with v = 1 (RFC 8547 §4.1, RFC 8548 §3.5)
KEYLOG_SS = re.compile(r"^SS [0-9a-f]{36} [0-9a-f]{64}$", re.MULTILINE)


def _cli(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nfq_tcpcrypt", *args, "--control", daemon.control],
        capture_output=True,
        text=True,
        timeout=15,
        check=False,
    )


def _decoded(fetched: Fetched, keylogs: list[str]) -> ConnectionReport:
    """`decode` of one fetch's capture with both key logs: its one HTTP connection."""
    keylog = fetched.pcap.with_suffix(".keys")
    keylog.write_text("".join(Path(path).read_text() for path in keylogs))
    report = decode_pcap(str(fetched.pcap), str(keylog))
    print(render_text(report))
    assert len(report.connections) == 1, render_text(report)
    return report.connections[0]


def _sessions_of(running: dict[str, Daemon], conn: ConnectionReport) -> tuple[dict[str, Any], dict[str, Any]]:
    """Each end's session entry of the connection `conn` (a is the client)."""
    a = [e for e in http_sessions(running["a"]) if e["local"] == conn.client]
    b = [e for e in http_sessions(running["b"]) if e["remote"] == conn.client]
    assert len(a) == 1 and len(b) == 1, (conn.client, a, b)
    return a[0], b[0]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("nonce_len", [8, 0])
def test_resume_then_flush(topo: Topology, tmp_path: Path, nonce_len: int) -> None:
    """Fresh, then resumed (no Init messages, equal session IDs, SS key-log line), then fresh after a flush."""
    with daemons(topo, tmp_path, ["--resume-nonce-len", str(nonce_len)]) as running:
        keylogs = [running["a"].keylog, running["b"].keylog]
        with serving(topo, tmp_path, SMALL) as served:
            first = fetch_captured(topo, tmp_path, served, "first")
            shown = _cli(running["a"], "cache", "show", "--json")
            second = fetch_captured(topo, tmp_path, served, "second")
            flushed = _cli(running["a"], "cache", "flush")
            third = fetch_captured(topo, tmp_path, served, "third")
        conns = [_decoded(fetched, keylogs) for fetched in (first, second, third)]
        entries = [_sessions_of(running, conn) for conn in conns]
        assert_no_faults(running)
    digest = sha256_file(served.path)
    for fetched in (first, second, third):
        assert sha256_file(fetched.received) == digest
        assert fetched.wire.leaks == {}, fetched.wire.leaks

    # 1. A full key exchange, and its secret cached on the client.
    assert_encrypted_wire(first)
    assert not conns[0].resumed and conns[0].init1 is not None
    assert shown.returncode == 0, shown.stderr
    cache = json.loads(shown.stdout)
    assert [(e["peer"], e["tep"], e["original_role"]) for e in cache] == [("10.77.0.2", "x25519", "A")], cache
    assert not any(re.search(r"[0-9a-f]{32}", json.dumps(e)) for e in cache), "cache show leaks a secret"

    # 2. Resumed: resume suboptions in SYN and SYN-ACK, no Init messages, frames verified.
    conn = conns[1]
    wire = second.wire
    assert wire.syn_has_eno and wire.synack_has_eno
    assert not wire.any_init_magic, (wire.client_stream[:8].hex(), wire.server_stream[:8].hex())
    assert conn.status == "encrypted" and conn.resumed, conn.reason
    assert conn.init1 is None and conn.init2 is None
    for eno in (conn.syn_eno, conn.synack_eno):
        assert eno is not None
        resume = [s for s in eno.suboptions if s.byte == RESUME_TEP_BYTE]
        assert len(resume) == 1, eno
        data = bytes.fromhex(resume[0].data)
        assert len(data) == 9 + nonce_len, (eno.raw, nonce_len)
    if nonce_len:
        assert conn.nonce_a and conn.nonce_b and conn.nonce_a != conn.nonce_b
    a, b = entries[1]
    assert a["resumed"] is True and b["resumed"] is True, (a, b)
    assert a["session_id"] == b["session_id"] == conn.session_id
    assert a["session_id"] != entries[0][0]["session_id"]
    for direction in conn.directions:
        assert direction.framing_valid and direction.failed == 0 and direction.verified > 0
    for path in keylogs:
        assert KEYLOG_SS.search(Path(path).read_text()), f"no SS line in {path}"

    # 3. After `cache flush` on the client, the next connection does a full key exchange again.
    assert flushed.returncode == 0 and "flushed 1" in flushed.stdout, (flushed.stdout, flushed.stderr)
    assert_encrypted_wire(third)
    assert not conns[2].resumed and conns[2].init1 is not None
    assert entries[2][0]["resumed"] is False and entries[2][1]["resumed"] is False
    assert entries[2][0]["session_id"] == entries[2][1]["session_id"]


@pytest.mark.timeout(90)
def test_no_resume_means_fresh_every_time(topo: Topology, tmp_path: Path) -> None:
    """`--no-resume` on the client: nothing cached, every connection does a full key exchange."""
    with daemons(topo, tmp_path, only={"a": ["--no-resume"]}) as running:
        with serving(topo, tmp_path, SMALL) as served:
            fetched = [fetch_captured(topo, tmp_path, served, f"f{i}") for i in range(2)]
        shown = _cli(running["a"], "cache", "show")
        assert_no_faults(running)
    assert shown.returncode == 0 and "(resumption cache empty)" in shown.stdout, shown
    for one in fetched:
        assert_encrypted_wire(one)
        assert sha256_file(one.received) == sha256_file(served.path)


_FAKE_VMGENID = r"""
import socket
sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 15)  # NETLINK_KOBJECT_UEVENT
sock.bind((0, 0))
message = (b"change@/devices/LNXSYSTM:00/LNXSYBUS:00/QEMUVGID:00\0ACTION=change\0"
           b"DEVPATH=/devices/LNXSYSTM:00/LNXSYBUS:00/QEMUVGID:00\0SUBSYSTEM=acpi\0NEW_VMGENID=1\0SEQNUM=1\0")
sock.sendto(message, (0, 1))  # to the kernel uevent group, as the vmgenid driver's KOBJ_CHANGE does
"""


@pytest.mark.timeout(90)
def test_new_vm_generation_flushes_the_cache(topo: Topology, tmp_path: Path) -> None:
    """Beyond RFC 8548: a NEW_VMGENID=1 uevent in a's namespace empties a's cache; the next connection is fresh.

    The uevent is forged from userspace (root may multicast on NETLINK_KOBJECT_UEVENT in its own
    namespace) with the bytes the vmgenid driver sends; the daemon cannot tell the difference.
    """
    with daemons(topo, tmp_path) as running:
        with serving(topo, tmp_path, SMALL) as served:
            first = fetch_captured(topo, tmp_path, served, "first")
            cached = json.loads(_cli(running["a"], "cache", "show", "--json").stdout)
            sent = topo.run("a", [sys.executable, "-c", _FAKE_VMGENID], timeout=15)
            assert sent.returncode == 0, sent.stderr
            deadline = time.monotonic() + 5
            while (
                running["a"].counters().get("shell.cache_flush_vmgenid", 0) == 0
                and time.monotonic() < deadline
            ):
                time.sleep(0.05)
            after = json.loads(_cli(running["a"], "cache", "show", "--json").stdout)
            second = fetch_captured(topo, tmp_path, served, "second")
        counters = running["a"].counters()
        assert_no_faults(running)
    assert len(cached) == 1 and after == [], (cached, after)
    assert counters["shell.cache_flush_vmgenid"] == 1 and counters.get("shell.cache_flush_suspend", 0) == 0
    assert "new VM generation" in Path(running["a"].log).read_text()
    for fetched in (first, second):
        assert_encrypted_wire(fetched)  # both fresh: Init1/Init2 at the stream starts


@pytest.mark.timeout(90)
def test_reversed_roles(topo: Topology, tmp_path: Path) -> None:
    """RFC 8548 §3.5: the host that was B (the server b) opens the resumed connection to the old A."""
    from nfq_tcpcrypt.lab.net import capture, fetch, http_server, make_payload

    www = tmp_path / "www-a"
    www.mkdir()
    make_payload(www / "f.bin", SMALL)
    with daemons(topo, tmp_path) as running:
        keylogs = [running["a"].keylog, running["b"].keylog]
        with serving(topo, tmp_path, SMALL) as served:
            first = fetch_captured(topo, tmp_path, served, "first")  # a -> b: a is A, b is B
        cached_b = json.loads(_cli(running["b"], "cache", "show", "--json").stdout)
        pcap = tmp_path / "reverse.pcap"
        with http_server(topo, "a", www) as url, capture(topo, "a", pcap):
            fetch(topo, "b", f"{url}/f.bin", tmp_path / "reverse.bin", 30)  # b -> a
        b_table = [e for e in running["b"].sessions() if str(e["remote"]).endswith(":8080")]
        a_table = [e for e in running["a"].sessions() if str(e["local"]).endswith(":8080")]
        assert_no_faults(running)
    assert_encrypted_wire(first)
    assert [(e["peer"], e["original_role"]) for e in cached_b] == [("10.77.0.1", "B")], cached_b
    assert sha256_file(tmp_path / "reverse.bin") == sha256_file(www / "f.bin")
    keylog = tmp_path / "all.keys"
    keylog.write_text("".join(Path(path).read_text() for path in keylogs))
    report = decode_pcap(str(pcap), str(keylog))
    conns = [c for c in report.connections if c.server.endswith(":8080") and c.server.startswith("10.77.0.1")]
    assert len(conns) == 1, render_text(report)
    conn = conns[0]
    assert conn.resumed and conn.init1 is None, render_text(report)
    assert conn.original_a == "server", render_text(report)  # the old A (a) is now the passive side
    assert all(d.failed == 0 and d.verified > 0 for d in conn.directions), render_text(report)
    assert len(a_table) == 1 and len(b_table) == 1
    assert a_table[0]["resumed"] and b_table[0]["resumed"]
    assert a_table[0]["session_id"] == b_table[0]["session_id"] == conn.session_id
