"""Super-packets under the engine (docs/architecture.md: Sizes): on the fast backend the queues are
bound with GSO, so the sender's stack hands its GSO packets over whole and the engine frames each
one as a single frame; the kernel segments it after the verdict.

Proved on the wire, not only by counters: the file arrives whole, no plaintext is on the wire,
`decode` with both key logs verifies every frame of both directions, and the server's direction
holds far fewer frames than MTU-sized segments (a frame per segment would be about 1 per 1428
bytes). Once loss-free between two namespaces, and through a router that drops 1 % of the packets
(2 % with 16 MiB) it forwards over links that segment (retransmissions then are slices of big frames, SACK blocks
fall inside frames), with GRO where the packets arrive (the receiving daemon gets super-packets
too) and without (it gets MTU-sized segments)."""

from __future__ import annotations

from pathlib import Path

import pytest

from nfq_tcpcrypt.lab.net import (
    HTTP_PORT,
    Topology,
    TransferResult,
    gro_on_arrival,
    http_transfer,
    rule_packets,
    segment_on_wire,
    shell_faults,
)

from .decoded import decoded_connections

pytestmark = pytest.mark.own_backend  # the daemons run on the fast backend (FAST) whatever the suite's choice

SIZE = 8 * 1024 * 1024
FAST = ["--queue-backend", "fast"]
SEGMENT = 1428  # plain bytes per MTU-sized segment (MSS 1460 less 20 of frame overhead and 12 of timestamps)


def _assert_super_packets(result: TransferResult, size: int = SIZE, share: int = 3) -> None:
    """Digest, no plaintext, every frame verified by decode, super-packets framed whole: fewer than
    1/`share` of a packet and a frame per MTU-sized segment (retransmissions under loss are slices
    of the stack's size)."""
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
    per_mib = sender["shell.packets_outbound"] / (size / 2**20)
    assert per_mib < 2**20 / SEGMENT / share, sender
    assert result.pcap is not None
    (conn,) = decoded_connections(result.pcap, result.keylogs.values(), HTTP_PORT)
    server = next(d for d in conn.directions if d.sender == conn.server)
    print(f"[gso] {result.fetch_seconds:.2f}s, sender queued {per_mib:.0f} packets/MiB out, "
          f"{sender.get('super_packets', 0)} super-packets, {server.frames} frames")
    # one frame per super-packet: far fewer frames than one per segment
    assert 0 < server.frames < size // SEGMENT // share, (server.frames, sender)


@pytest.mark.timeout(300)
def test_super_packets_are_framed_whole(topo: Topology, tmp_path: Path) -> None:
    result = http_transfer(topo, tmp_path, size=SIZE, daemon_args={"a": FAST, "b": FAST})
    _assert_super_packets(result)


def _tcp_ext(topo: Topology, side: str) -> dict[str, int]:
    """The TcpExt counters of `side`'s namespace (/proc/net/netstat)."""
    lines = [line.split() for line in topo.check(side, ["cat", "/proc/net/netstat"]).splitlines()]
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names[0] == "TcpExt:":
            return {name: int(value) for name, value in zip(names[1:], values[1:], strict=True)}
    return {}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("gro", [True, False], ids=["gro", "no-gro"])
def test_super_packets_under_loss_in_the_router(routed: Topology, tmp_path: Path, gro: bool) -> None:
    """The hosts' links segment what leaves them (as a NIC does): the sender's queue still gets
    super-packets, the router forwards and loses MTU-sized packets; with GRO where they arrive
    (lab.net.gro_on_arrival) the receiver's queue gets super-packets again, without it segments.

    Holes inside big frames never look like reneging to the sender's stack (docs/architecture.md:
    Loss inside frames): a SACKed segment at its new snd_una made Linux wait for a timeout."""
    for side in ("a", "b"):
        segment_on_wire(routed, side)
        if gro:
            gro_on_arrival(routed, side)
    routed.check("r", ["iptables", "-A", "FORWARD", "-p", "tcp", "-m", "statistic", "--mode", "random",
                       "--probability", "0.02", "-j", "DROP"])  # fmt: skip
    before = _tcp_ext(routed, "b")
    result = http_transfer(routed, tmp_path, size=2 * SIZE, timeout=150, daemon_args={"a": FAST, "b": FAST})
    after = _tcp_ext(routed, "b")
    sender = {name: after[name] - before.get(name, 0) for name in after if after[name] != before.get(name, 0)}
    dropped = rule_packets(routed, "r", "filter", "FORWARD", "statistic")
    receiver = result.counters["a"]
    print(f"[gso loss gro={gro}] dropped in r: {dropped}, receiver's queue: {receiver.get('shell.gso_packets', 0)}"
          f" super-packets of {receiver.get('shell.packets_inbound', 0)} in, sender: {sender}")
    assert dropped > 10
    # a sends only the request and ACKs: its super-packets are the wire's segments merged again
    assert (receiver.get("shell.gso_packets", 0) > 0) is gro, receiver
    assert sender.get("TCPSACKReneging", 0) == 0, sender
    _assert_super_packets(result, size=2 * SIZE, share=2)
