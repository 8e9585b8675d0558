"""SACK in both byte spaces: held out-of-order data is announced to the peer in wire
space, and the peer's blocks reach our stack in plain space on frame boundaries."""

from __future__ import annotations

from nfq_tcpcrypt.core.wire.tcp import parse_options, parse_segment, sack_pairs, serialize_segment
from nfq_tcpcrypt.lab.tcpmodel import A_IP, B_IP, Channel, Pair

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


def test_plaintext_our_stack_lost_goes_again_on_its_sack():
    # The 3rd decrypted segment toward B's stack is lost after B's engine (an INPUT rule, a full
    # queue). B's stack announces the hole with SACK blocks toward A; B's engine hands the missing
    # plaintext over again at once: no timer, and A's side resends nothing.
    pair = Pair(seed=b"local-loss")
    pair.open()
    seen = {"n": 0}
    receive = pair.b.receive

    def lossy(packet):
        if len(parse_segment(packet).payload) > 1000:
            seen["n"] += 1
            if seen["n"] == 3:
                return
        receive(packet)

    pair.b.receive = lossy
    data = bytes(range(256)) * 100
    pair.a.write(data)
    pair.run(max_time=0.1)  # well before the replay timer (0.5 s) or the model's RTO (0.2 s)
    assert bytes(pair.b.received) == data
    session = pair.engine_b.session_table()[0]
    assert session["redelivered"] == 1 and session["replayed"] == 0
    seqs = [parse_segment(p).seq for p in pair.wire if parse_segment(p).src == A_IP and parse_segment(p).payload]
    assert len(seqs) == len(set(seqs)), ("A's side retransmitted", sorted(s for s in seqs if seqs.count(s) > 1))


def test_plaintext_our_stack_lost_while_it_had_no_room_goes_again_once_it_has():
    # As above, but B's stack reports the hole while it offers no window (its buffer is full):
    # nothing can go again at once, and when its window opens again it says so with no duplicate
    # ACK, nor does A's side resend (here it would wait 10 s). The replay timer hands the
    # plaintext over once B's stack has room.
    pair = Pair(seed=b"local-loss")
    pair.open()
    pair.a.RTO = 10.0  # type: ignore[misc]
    seen = {"n": 0}
    receive, emit = pair.b.receive, pair.b._emit
    full = {"until": 0.0}

    def lossy(packet):
        if len(parse_segment(packet).payload) > 1000:
            seen["n"] += 1
            if seen["n"] == 3:
                full["until"] = pair.now + 0.3  # B's application reads again 0.3 s later
                return
        receive(packet)

    def windowless(flags, payload=b"", options=None, seq=None):  # type: ignore[no-untyped-def]
        emit(flags, payload, options, seq)
        if pair.now < full["until"]:
            seg = parse_segment(pair.b.out[-1])
            seg.window = 0
            pair.b.out[-1] = serialize_segment(seg)

    pair.b.receive, pair.b._emit = lossy, windowless
    data = bytes(range(256)) * 100
    pair.a.write(data)
    pair.run(max_time=2.0)
    assert bytes(pair.b.received) == data
    session = pair.engine_b.session_table()[0]
    assert session["replayed"] >= 1
