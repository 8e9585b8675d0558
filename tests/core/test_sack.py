"""SACK in both byte spaces (issue 4): held out-of-order data is announced to the peer in wire
space, and the peer's blocks reach our stack in plain space on frame boundaries."""

from __future__ import annotations

from nfq_tcpcrypt.core.wire.tcp import parse_options, parse_segment, sack_pairs
from tests.core.tcpmodel import A_IP, B_IP, Channel, Pair

MASK = 0xFFFFFFFF
SEG = 1428  # plain bytes per segment of the model's stack: MSS 1440 less 12 bytes of timestamps
FRAME = SEG + 20  # one frame per segment on the wire


class DropOne(Channel):
    """Loses the n-th data segment from A, once."""

    def __init__(self, nth: int) -> None:
        super().__init__(0)
        self.nth, self.seen = nth, 0

    def carry(self, packet):
        seg = parse_segment(packet)
        if seg.src == A_IP and len(seg.payload) > 1000:
            self.seen += 1
            if self.seen == self.nth:
                return []
        return [(0, packet)]


def _blocks(packet: bytes) -> list[tuple[int, int]]:
    options = parse_options(parse_segment(packet).options)
    return [pair for kind, raw in options if kind == 5 for pair in sack_pairs(raw)]


def test_sack_blocks_cross_both_spaces():
    pair = Pair(seed=b"sack", channel=DropOne(3))
    pair.open()
    seen_by_a: list[bytes] = []
    receive = pair.a.receive
    pair.a.receive = lambda packet: (seen_by_a.append(packet), receive(packet))[1]
    data = bytes(range(256)) * 100  # 25600 bytes: 18 segments of 1428 (1440 less the timestamps)
    pair.a.write(data)
    pair.run()
    assert bytes(pair.b.received) == data

    # On the wire, B's engine sent duplicate ACKs with SACK blocks for what it held (wire space):
    # the blocks start after the lost frame, on a frame boundary (1448 = 1428 + 20 per frame).
    wire_sacks = [b for p in pair.wire if parse_segment(p).src == B_IP for b in _blocks(p)]
    assert wire_sacks, "no SACK block on the wire"
    isn_a = pair.a.isn
    init1_len = 75
    lost_wire_start = init1_len + 2 * FRAME
    for left, _right in wire_sacks:
        offset = (left - isn_a - 1) & MASK
        assert offset >= lost_wire_start + FRAME and (offset - init1_len) % FRAME == 0
    # A's stack saw the same blocks in plain space, on its own segment boundaries.
    plain_sacks = [b for p in seen_by_a for b in _blocks(p)]
    assert plain_sacks, "no SACK block reached A's stack"
    for left, right in plain_sacks:
        lo, hi = (left - isn_a - 1) & MASK, (right - isn_a - 1) & MASK
        assert lo >= 3 * SEG and lo % SEG == 0 and hi % SEG in (0, len(data) % SEG) and hi <= len(data)
