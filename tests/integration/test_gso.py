"""Super-packets under the engine (docs/architecture.md: Sizes): on the fast backend the queues are
bound with GSO, so the sender's stack hands its GSO packets over whole and the engine frames each
one as a single frame; the kernel segments it after the verdict.

Proved on the wire, not only by counters: the file arrives whole, no plaintext is on the wire,
`decode` with both key logs verifies every frame of both directions, and the server's direction
holds far fewer frames than MTU-sized segments (a frame per segment would be about 1 per 1428
bytes). Once loss-free between two namespaces, once through a router that drops 1 % of the packets
it forwards (retransmissions then are slices of big frames, SACK blocks fall inside frames)."""

from __future__ import annotations

from pathlib import Path

import pytest

from nfq_tcpcrypt.lab.net import (
    HTTP_PORT,
    Topology,
    TransferResult,
    http_transfer,
    rule_packets,
    segment_on_wire,
    shell_faults,
)

from .decoded import decoded_connections

SIZE = 8 * 1024 * 1024
FAST = ["--queue-backend", "fast"]
SEGMENT = 1428  # plain bytes per MTU-sized segment (MSS 1460 less 20 of frame overhead and 12 of timestamps)


def _assert_super_packets(result: TransferResult) -> None:
    """Digest, no plaintext, every frame verified by decode, super-packets framed whole."""
    assert result.received_sha256 == result.sent_sha256
    assert result.wire.syn_has_eno
    assert result.wire.leaks == {}, f"plaintext on the wire: {result.wire.leaks}"
    a, b = result.session_for("a"), result.session_for("b")
    assert a is not None and b is not None and a["session_id"] == b["session_id"]
    for side, daemon in result.daemons.items():
        assert daemon.proc.returncode == 0, Path(daemon.log).read_text()[-3000:]
        assert shell_faults(result.counters[side]) == {}, (side, result.counters[side])
    sender = result.counters["b"]  # the HTTP server sends the file
    assert sender.get("shell.gso_packets", 0) > 0, sender
    assert sender.get("super_packets", 0) > 0, sender
    # super-packets: far fewer packets queued on the way out than MTU-sized segments per MiB
    per_mib = sender["shell.packets_outbound"] / (SIZE / 2**20)
    assert per_mib < 2**20 / SEGMENT / 3, sender
    assert result.pcap is not None
    (conn,) = decoded_connections(result.pcap, result.keylogs.values(), HTTP_PORT)
    server = next(d for d in conn.directions if d.sender == conn.server)
    print(f"[gso] {result.fetch_seconds:.2f}s, sender queued {per_mib:.0f} packets/MiB out, "
          f"{sender.get('super_packets', 0)} super-packets, {server.frames} frames")
    # one frame per super-packet: far fewer frames than one per segment
    assert 0 < server.frames < SIZE // SEGMENT // 3, (server.frames, sender)


@pytest.mark.timeout(300)
def test_super_packets_are_framed_whole(topo: Topology, tmp_path: Path) -> None:
    result = http_transfer(topo, tmp_path, size=SIZE, daemon_args={"a": FAST, "b": FAST})
    _assert_super_packets(result)


@pytest.mark.timeout(300)
def test_super_packets_under_loss_in_the_router(routed: Topology, tmp_path: Path) -> None:
    """The hosts' links segment what leaves them (as a NIC does): the sender's queue still gets
    super-packets, the router forwards and loses MTU-sized packets, the receiver gets segments."""
    for side in ("a", "b"):
        segment_on_wire(routed, side)
    routed.check("r", ["iptables", "-A", "FORWARD", "-p", "tcp", "-m", "statistic", "--mode", "random",
                       "--probability", "0.01", "-j", "DROP"])  # fmt: skip
    result = http_transfer(routed, tmp_path, size=SIZE, timeout=150, daemon_args={"a": FAST, "b": FAST})
    dropped = rule_packets(routed, "r", "filter", "FORWARD", "statistic")
    print(f"[gso loss] dropped in r: {dropped}")
    assert dropped > 10
    _assert_super_packets(result)
