"""Super-packets (docs/architecture.md: Sizes): one frame per GSO packet in one verdict, what a
verdict cannot hold sent apart, retransmissions as byte-identical slices of logged frames, the
peer's SACK blocks mapped inside frames, and the checksum rules (verify only what the kernel did
not; leave an outbound super-packet's checksum to the kernel)."""

from __future__ import annotations

import struct

import pytest

from nfq_tcpcrypt.core.constants import TCP_ACK, TCP_PSH
from nfq_tcpcrypt.core.flow import Direction
from nfq_tcpcrypt.core.seqmap import DATA_AT
from nfq_tcpcrypt.core.translate import SUPER_PACKET_MAX
from nfq_tcpcrypt.core.verdict import UNKNOWN, Action, PacketInfo
from nfq_tcpcrypt.core.wire.tcp import new_segment, parse_options, parse_segment, sack_pairs, serialize_segment
from nfq_tcpcrypt.lab.tcpmodel import A_IP, B_IP, GSO_INFO, MASK, Pair, _segment

PLAIN_GSO = PacketInfo(gso=True, checksum_trusted=True)


def _live(seed: bytes = b"gso") -> Pair:
    pair = Pair(seed=seed)
    pair.open()
    pair.talk(b"hello", b"world")  # keys exist both ways
    return pair


def _from_a(pair: Pair, plain: int, payload: bytes, flags: int = TCP_ACK | TCP_PSH) -> bytes:
    """A segment of A's stack at plain offset `plain` of its stream, as its stack would send it."""
    a = pair.a
    seg = new_segment(A_IP, B_IP, a.port, a.peer_port, (a.isn + 1 + plain) & MASK, a.rcv_nxt, flags, 1000,
                      a._options(), payload)  # fmt: skip
    return serialize_segment(seg)


def _send(pair: Pair):
    session = next(iter(pair.engine_a._sessions.values()))
    return session.tx.send


def _tcp_checksum_field(packet: bytes) -> int:
    ihl = (packet[0] & 0x0F) * 4
    return int(struct.unpack_from("!H", packet, ihl + 16)[0])


def test_a_super_packet_is_one_frame_in_one_verdict_and_opens_at_the_peer():
    pair = _live()
    send = _send(pair)
    frames_before, wire_before = len(send.frames), send.wire_next
    data = bytes(range(252)) * 238  # 59976 bytes: 42 segments of 1428 in one GSO packet
    start = pair.a.nxt
    verdict = pair.engine_a.process(_from_a(pair, start, data), Direction.OUTBOUND, pair.now, info=GSO_INFO)
    assert verdict.action is Action.ACCEPT and verdict.packet is not None
    seg = parse_segment(verdict.packet)
    assert len(send.frames) == frames_before + 1  # one AEAD call for the whole super-packet
    frame = send.frames[-1]
    assert frame.wire_start == wire_before and len(frame.data) == len(data) + 20
    assert seg.payload == frame.data  # the whole frame in the verdict
    assert _tcp_checksum_field(verdict.packet) == 0  # the kernel's segmentation writes it
    assert pair.engine_a.counters["super_packets"] == 1
    assert pair.engine_a.segments_to_inject() == []  # nothing sent apart
    # The kernel segments it at the stack's segment size; the peer reassembles and opens one frame.
    pieces = _segment(verdict.packet, 1428)
    assert len(pieces) == 42 + 1 and all(len(parse_segment(p).payload) <= 1428 for p in pieces)
    pair.a.nxt += len(data)
    for piece in pieces:
        out = pair.engine_b.process(piece, Direction.INBOUND, pair.now)
        if out.action is Action.ACCEPT:
            pair.b.receive(out.packet or piece)
        for injection in pair.engine_b.segments_to_inject():  # plaintext beyond deliver_max
            if injection.direction is Direction.INBOUND:
                pair.b.receive(injection.packet)
    assert bytes(pair.b.received).endswith(data) and len(pair.b.received) == start + len(data)


def test_what_a_verdict_cannot_hold_goes_in_segments_of_its_own():
    pair = _live(b"gso-max")
    send = _send(pair)
    data = bytes(65535 - 20 - 32)  # the largest GSO packet (IPv4, timestamps): 65,483 bytes of payload
    verdict = pair.engine_a.process(_from_a(pair, pair.a.nxt, data), Direction.OUTBOUND, pair.now, info=GSO_INFO)
    assert verdict.packet is not None and len(verdict.packet) <= SUPER_PACKET_MAX
    frame = send.frames[-1]
    head = parse_segment(verdict.packet).payload
    rest = [parse_segment(i.packet) for i in pair.engine_a.segments_to_inject()]
    assert rest and all(i.direction is Direction.OUTBOUND for i in pair.engine_a.segments_to_inject()) is True
    assert all(len(s.payload) + len(s.options) <= 1460 for s in rest)
    assert head + b"".join(s.payload for s in rest) == frame.data  # contiguous, byte-identical
    base = send.base
    assert (rest[0].seq - base) & MASK == frame.wire_start + len(head)


def test_retransmissions_are_byte_identical_slices_of_the_logged_frame():
    pair = _live(b"gso-slice")
    send = _send(pair)
    data = bytes(range(251)) * 200  # 50200 bytes, one frame
    start = pair.a.nxt
    pair.engine_a.process(_from_a(pair, start, data), Direction.OUTBOUND, pair.now, info=GSO_INFO)
    frame = send.frames[-1]
    for lo, hi in ((0, 1428), (1428 * 3, 1428 * 4), (len(data) - 1000, len(data)), (100, 1300)):
        verdict = pair.engine_a.process(_from_a(pair, start + lo, data[lo:hi]), Direction.OUTBOUND, pair.now)
        assert verdict.packet is not None and not pair.engine_a.segments_to_inject()
        seg = parse_segment(verdict.packet, verify_checksum=True)  # not GSO: a complete checksum
        assert len(seg.payload) <= hi - lo + 20  # about the size the stack chose
        # from inside the frame: from where the wire segment that carried plain byte `lo` began
        # (the kernel cut the frame at the stack's segment size, DATA_AT bytes ahead)
        wire_lo = frame.wire_start + lo
        wire_hi = frame.wire_end if hi == len(data) else frame.wire_start + DATA_AT + hi
        assert (seg.seq - send.base) & MASK == wire_lo
        assert seg.payload == frame.data[wire_lo - frame.wire_start : wire_hi - frame.wire_start]
    # a GSO retransmission of several segments is one slice too
    verdict = pair.engine_a.process(_from_a(pair, start + 2856, data[2856:14280]), Direction.OUTBOUND, pair.now,
                                    info=GSO_INFO)  # fmt: skip
    seg = parse_segment(verdict.packet)
    assert seg.payload == frame.data[2856 : DATA_AT + 14280]
    assert len(send.frames) and send.frames[-1] is frame  # nothing framed again


def _sack_in(pair: Pair, blocks: list[tuple[int, int]], acks: list[int] | None = None) -> list[tuple[int, int]]:
    """A duplicate ACK from B's side on the wire with SACK blocks at wire offsets of A's stream;
    the plain blocks (offsets) A's stack gets (and its ACK's offset appended to `acks`)."""
    send = _send(pair)
    session = next(iter(pair.engine_a._sessions.values()))
    ts = struct.pack("!BBBBII", 1, 1, 8, 10, 5, 5)
    body = b"".join(struct.pack("!II", (send.base + lo) & MASK, (send.base + hi) & MASK) for lo, hi in blocks)
    options = ts + bytes((1, 1, 5, 2 + len(body))) + body
    recv = session.tx.recv
    seg = new_segment(B_IP, A_IP, pair.b.port, pair.a.port, (recv.base + recv.wire_next) & MASK,
                      (send.base + send.acked_wire) & MASK, TCP_ACK, 1000, options)  # fmt: skip
    verdict = pair.engine_a.process(serialize_segment(seg), Direction.INBOUND, pair.now)
    out = parse_segment(verdict.packet)
    if acks is not None:
        acks.append((out.ack - send.base) & MASK)
    return [((left - send.base) & MASK, (right - send.base) & MASK)
            for kind, raw in parse_options(out.options) if kind == 5 for left, right in sack_pairs(raw)]


def test_sack_blocks_inside_frames_map_to_the_plain_bytes_they_cover():
    pair = _live(b"gso-sack")
    send = _send(pair)
    data = bytes(40000)
    pair.engine_a.process(_from_a(pair, pair.a.nxt, data), Direction.OUTBOUND, pair.now, info=GSO_INFO)
    f = send.frames[-1]
    ws, ps = f.wire_start, f.plain_start
    # segments 3..5 of the frame arrived beyond a hole: their plain bytes, and DATA_AT more at the
    # end (the next wire segment brings them back with the stack's next segment, started early)
    lo, hi = ws + DATA_AT + 1428 * 3, ws + DATA_AT + 1428 * 6
    assert _sack_in(pair, [(lo, hi)]) == [(ps + 1428 * 3, ps + 1428 * 6 + DATA_AT)]
    assert send.acked_plain == ps
    assert send.sack_to_plain(ws, ws + DATA_AT + 100) == (ps, ps + 100 + DATA_AT)
    # a block that lacks the header: plain byte 0 stays a hole (its retransmission brings the header)
    assert _sack_in(pair, [(ws + 2, ws + DATA_AT + 100)]) == [(ps + 1, ps + 100 + DATA_AT)]
    # up to the frame's last data byte without the tag: the last byte stays a hole (it brings the tag)
    end = ws + DATA_AT + len(data)
    assert _sack_in(pair, [(ws + DATA_AT + 1000, end)]) == [(ps + 1000, ps + len(data) - 1)]
    # with the tag: through the frame's end
    assert _sack_in(pair, [(ws + DATA_AT + 1000, f.wire_end)]) == [(ps + 1000, f.plain_end)]
    # inside the header or the tag only: nothing to tell our stack
    assert _sack_in(pair, [(ws + 1, ws + 3)]) == []
    # the cumulative ACK stays on whole frames: an ACK inside the frame acknowledges nothing of it
    assert send.acked_plain <= ps


def test_bytes_the_peer_holds_from_its_ack_on_are_acknowledged_to_our_stack():
    """A block from the cumulative ACK (the first bytes of a frame the peer cannot open yet, held
    in order) moves the ACK our stack sees to their end, never back; a block that ends inside a
    frame SACKs that frame's first byte too (left out, our stack's RACK resent the segment while
    the frame was still arriving: about 3 resent segments per lost one instead of 1.2)."""
    pair = _live(b"gso-held")
    send = _send(pair)
    data = bytes(40000)
    pair.engine_a.process(_from_a(pair, pair.a.nxt, data), Direction.OUTBOUND, pair.now, info=GSO_INFO)
    first = send.frames[-1]
    pair.engine_a.process(_from_a(pair, pair.a.nxt + len(data), data), Direction.OUTBOUND, pair.now, info=GSO_INFO)
    second = send.frames[-1]
    ws, ps = first.wire_start, first.plain_start
    acks: list[int] = []
    # beyond a hole in the first frame: the second frame's first 100 bytes, its first byte too
    blocks = _sack_in(pair, [(second.wire_start, second.wire_start + DATA_AT + 100)], acks)
    assert blocks == [(second.plain_start, second.plain_start + 100 + DATA_AT)]
    # the first frame's tail and the second's start in one block: one block across the frames
    blocks = _sack_in(pair, [(ws + DATA_AT + 1428, second.wire_start + DATA_AT + 100)], acks)
    assert blocks == [(ps + 1428, second.plain_start + 100 + DATA_AT)]
    assert acks == [ps, ps]
    # the peer holds the first frame's first 100 bytes from its ACK on: our stack's ACK moves there
    assert _sack_in(pair, [(ws, ws + DATA_AT + 100)], acks) == []
    assert send.acked_plain == ps and acks[-1] == ps + 100 + DATA_AT
    # a later ACK at the frame's start without the block does not take it back
    assert _sack_in(pair, [], acks) == [] and acks[-1] == ps + 100 + DATA_AT
    # the stack resends from there: the wire bytes from the end of what the peer holds
    start = pair.a.nxt + 100 + DATA_AT
    verdict = pair.engine_a.process(_from_a(pair, start, data[:1428]), Direction.OUTBOUND, pair.now)
    assert (parse_segment(verdict.packet).seq - send.base) & MASK == ws + DATA_AT + 100


@pytest.mark.parametrize(("info", "verified"), [(UNKNOWN, True), (PacketInfo(checksum_trusted=True), False),
                                                 (PLAIN_GSO, False)])  # fmt: skip
def test_inbound_checksums_are_verified_unless_the_kernel_vouches(info: PacketInfo, verified: bool):
    pair = _live(b"gso-csum")
    session = next(iter(pair.engine_a._sessions.values()))
    recv, send = session.tx.recv, session.tx.send
    seg = new_segment(B_IP, A_IP, pair.b.port, pair.a.port, (recv.base + recv.wire_next) & MASK,
                      (send.base + send.acked_wire) & MASK, TCP_ACK, 1000)  # fmt: skip
    packet = bytearray(serialize_segment(seg))
    packet[36] ^= 0xFF  # a wrong TCP checksum
    before = pair.engine_a.counters["malformed"]
    pair.engine_a.process(bytes(packet), Direction.INBOUND, pair.now, info=info)
    assert (pair.engine_a.counters["malformed"] > before) is verified


def test_outbound_checksums_are_complete_unless_the_kernel_segments():
    pair = _live(b"gso-out")
    start = pair.a.nxt
    small = pair.engine_a.process(_from_a(pair, start, b"x" * 1000), Direction.OUTBOUND, pair.now)
    parse_segment(small.packet, verify_checksum=True)  # sent as is: complete
    big = pair.engine_a.process(_from_a(pair, start + 1000, b"y" * 20000), Direction.OUTBOUND, pair.now,
                                info=GSO_INFO)  # fmt: skip
    assert _tcp_checksum_field(big.packet) == 0
    for piece in _segment(big.packet, 1428):  # what the kernel puts on the wire
        parse_segment(piece, verify_checksum=True)


def test_an_inbound_super_packet_is_delivered_whole_in_host_mode_and_in_deliver_max_on_a_gateway():
    for gso_deliver in (True, False):
        from nfq_tcpcrypt.lab.tcpmodel import seeded_config

        pair = Pair(seed=b"gro", b_config=seeded_config(b"grob", gso_deliver=gso_deliver))
        pair.open()
        pair.talk(b"hi", b"ho")
        data = bytes(range(256)) * 200  # 51200 bytes from A: one frame
        verdict = pair.engine_a.process(_from_a(pair, pair.a.nxt, data), Direction.OUTBOUND, pair.now,
                                        info=GSO_INFO)  # fmt: skip
        pair.a.nxt += len(data)
        # GRO at B: the wire bytes arrive as one super-packet with a complete checksum
        wire = parse_segment(verdict.packet)
        wire.kernel_checksum = False
        out = pair.engine_b.process(serialize_segment(wire), Direction.INBOUND, pair.now, info=PLAIN_GSO)
        delivered = parse_segment(out.packet, verify_checksum=True)  # TCP verifies it in software
        injected = pair.engine_b.segments_to_inject()
        if gso_deliver:
            assert delivered.payload == data and not injected
        else:
            assert len(delivered.payload) <= 32768 and injected
            assert delivered.payload + b"".join(parse_segment(i.packet).payload for i in injected) == data


def test_the_window_our_stack_sees_leaves_room_for_the_frame_overhead():
    """A packet that fills the peer's window in plain bytes must fit it on the wire, frame overhead
    included (the peer's engine takes nothing beyond its stack's window, and a cut frame could
    never be opened): the window field shown to our stack is lowered by 1/64, at least 20 bytes,
    rounded down in the peer's scaled units."""
    pair = _live(b"gso-window")
    tx = next(iter(pair.engine_a._sessions.values())).tx
    tx.local_ws, tx.remote_ws = 7, 10
    for field in (1, 2, 45, 63, 64, 1000):
        shown = tx._plain_window(field)
        plain = shown << 10
        assert plain + 20 <= field << 10 and shown >= field - 1 - field // 64
    tx.local_ws = tx.remote_ws = None  # no scaling
    assert tx._plain_window(1000) == 980 and tx._plain_window(6400) == 6300 and tx._plain_window(10) == 0


def test_the_receiver_sacks_the_bytes_of_a_frame_it_cannot_open_yet():
    """A segment inside a big frame is lost: the receiving engine's duplicate ACKs carry, beside
    the block of what it holds beyond the gap, the block of the frame's first bytes it holds in
    order (the cumulative ACK stays at the frame's start); the sender's engine shows its stack
    both, the first from one byte after the ACK, so the stack resends just the lost segment."""
    pair = _live(b"gso-partial")
    send = _send(pair)
    data = bytes(range(200)) * 200  # 40000 bytes: one frame
    verdict = pair.engine_a.process(_from_a(pair, pair.a.nxt, data), Direction.OUTBOUND, pair.now, info=GSO_INFO)
    f = send.frames[-1]
    pieces = _segment(verdict.packet, 1428)
    acks = []
    for i, piece in enumerate(pieces[:6]):
        if i == 3:
            continue  # lost
        pair.engine_b.process(piece, Direction.INBOUND, pair.now)
        injected = [inj.packet for inj in pair.engine_b.segments_to_inject() if inj.direction is Direction.OUTBOUND]
        assert len(injected) == (i > 3), i  # one duplicate ACK per segment beyond the gap, none before
        acks += injected
    assert acks, "no duplicate ACK for the data beyond the gap"
    last = parse_segment(acks[-1])
    blocks = [((lo - send.base) & MASK, (hi - send.base) & MASK)
              for kind, raw in parse_options(last.options) if kind == 5 for lo, hi in sack_pairs(raw)]
    ws = f.wire_start
    assert blocks == [(ws + 1428 * 4, ws + 1428 * 6), (ws, ws + 1428 * 3)]
    assert (last.ack - send.base) & MASK == ws  # nothing of the frame acknowledged
    out = parse_segment(pair.engine_a.process(acks[-1], Direction.INBOUND, pair.now).packet)
    plain = [((lo - send.base) & MASK, (hi - send.base) & MASK)
             for kind, raw in parse_options(out.options) if kind == 5 for lo, hi in sack_pairs(raw)]
    ps = f.plain_start
    # what the peer holds from its ACK on is acknowledged to our stack, the rest SACKed
    assert plain == [(ps + 1428 * 4 - DATA_AT, ps + 1428 * 6)]
    assert (out.ack - send.base) & MASK == ps + 1428 * 3
    # segment 6 is lost too, 7 arrives; then 3 comes back: held in order while a later hole is
    # open, so ACKed at once with its block (our stack sees nothing of it)
    pair.engine_b.process(pieces[7], Direction.INBOUND, pair.now)
    pair.engine_b.segments_to_inject()
    pair.engine_b.process(pieces[3], Direction.INBOUND, pair.now)
    (filled,) = [inj.packet for inj in pair.engine_b.segments_to_inject() if inj.direction is Direction.OUTBOUND]
    held = [((lo - send.base) & MASK, (hi - send.base) & MASK)
            for kind, raw in parse_options(parse_segment(filled).options) if kind == 5 for lo, hi in sack_pairs(raw)]
    assert (ws, ws + 1428 * 6) in held
    assert parse_segment(filled).ack == last.ack  # the cumulative ACK stays at the frame's start


def test_a_resent_head_the_peer_holds_brings_the_bytes_it_lacks():
    """After a timeout the stack resends only its oldest unacknowledged segment. When the peer
    holds it (its SACK blocks say so) but lacks a piece further on in the same frame, the engine
    sends that piece from the frame log, byte-identical, so that the frame can be opened."""
    pair = _live(b"gso-head")
    send = _send(pair)
    data = bytes(range(200)) * 200  # 40000 bytes: one frame
    start = pair.a.nxt
    pair.engine_a.process(_from_a(pair, start, data), Direction.OUTBOUND, pair.now, info=GSO_INFO)
    f = send.frames[-1]
    ws = f.wire_start
    blocks = [(ws + 1428 * 4, ws + 1428 * 6), (ws, ws + 1428 * 3)]  # the peer lacks [3, 4) and the tail
    _sack_in(pair, blocks)
    lacks = [(ws + 1428 * 3, f.data[1428 * 3 : 1428 * 4]), (ws + 1428 * 6, f.data[1428 * 6 :])]
    assert send.head_holes() == [(wire, data, False) for wire, data in lacks]
    # the peer holds the frame's first 3 segments from its ACK on: our stack resends from there
    verdict = pair.engine_a.process(_from_a(pair, start + 1428 * 3, data[1428 * 3 : 1428 * 4]), Direction.OUTBOUND,
                                    pair.now)  # fmt: skip
    resent = [parse_segment(i.packet) for i in pair.engine_a.segments_to_inject()]
    assert b"".join(s.payload for s in resent) == b"".join(data for _, data in lacks)
    assert (resent[0].seq - send.base) & MASK == ws + 1428 * 3
    assert all(len(s.payload) + len(s.options) <= 1460 for s in resent)
    assert parse_segment(verdict.packet).payload == f.data[1428 * 3 : 1428 * 4 + DATA_AT]  # the stack's own
    # blocks that say nothing about the head frame: nothing sent beside the stack's own
    _sack_in(pair, [(f.wire_end + 10, f.wire_end + 20)])
    assert send.head_holes() == []


def test_frame_max_cuts_a_super_packet_into_frames_of_that_size():
    from nfq_tcpcrypt.lab.tcpmodel import seeded_config

    pair = Pair(seed=b"gso-fmax", a_config=seeded_config(b"fmaxa", frame_max=16384))
    pair.open()
    pair.talk(b"x", b"y")
    send = _send(pair)
    before = len(send.frames)
    data = bytes(range(250)) * 200  # 50000 bytes: frames of 16384, 16384, 16384, 848
    verdict = pair.engine_a.process(_from_a(pair, pair.a.nxt, data), Direction.OUTBOUND, pair.now, info=GSO_INFO)
    frames = send.frames[before:]
    assert [f.plain_end - f.plain_start for f in frames] == [16384, 16384, 16384, 848]
    assert parse_segment(verdict.packet).payload == b"".join(f.data for f in frames)


def test_a_lost_segment_leaves_room_for_what_the_window_holds_beyond_it():
    """One segment lost at the start of 3 MB in flight, within the 8 MiB window our stack offers
    (a Linux receiver's buffer grows to 6 MiB by default): the receiving engine holds everything
    beyond the gap, so its duplicate ACKs SACK all of it and the sender resends one segment, not
    every byte past a smaller out-of-order buffer (docs/architecture.md: Sizes)."""
    pair = _live(b"gso-window")
    send = _send(pair)
    b = pair.b
    ack = new_segment(B_IP, A_IP, b.port, b.peer_port, (b.isn + 1 + b.nxt) & MASK, b.rcv_nxt, TCP_ACK, 0xFFFF,
                      b._options())  # fmt: skip
    pair.engine_b.process(serialize_segment(ack), Direction.OUTBOUND, pair.now)  # 0xFFFF << 7: 8 MiB
    pair.engine_b.segments_to_inject()
    start, first_wire = pair.a.nxt, send.wire_next
    data = bytes(range(250)) * 240  # 60000 bytes per super-packet
    pieces = []
    for i in range(50):
        verdict = pair.engine_a.process(_from_a(pair, start + i * len(data), data), Direction.OUTBOUND, pair.now,
                                        info=GSO_INFO)  # fmt: skip
        pieces += _segment(verdict.packet, 1428)
    last = None
    for piece in pieces[1:]:  # the first wire segment is lost
        pair.engine_b.process(piece, Direction.INBOUND, pair.now)
        for inj in pair.engine_b.segments_to_inject():
            if inj.direction is Direction.OUTBOUND:
                last = parse_segment(inj.packet)
    assert last is not None
    blocks = [((lo - send.base) & MASK, (hi - send.base) & MASK)
              for kind, raw in parse_options(last.options) if kind == 5 for lo, hi in sack_pairs(raw)]
    assert blocks[0] == (first_wire + 1428, send.wire_next)  # everything beyond the gap is held
    assert (last.ack - send.base) & MASK == first_wire
