"""The established connection's per-packet path against plain references: the IPv4 header read
byte by byte, a new length's headers packed in one call, the usual options read by index, and the
FINs that the fast paths now take (docs/architecture.md: A packet's path)."""

from __future__ import annotations

import hashlib
import random
import struct

import pytest

from nfq_tcpcrypt.core.constants import TCP_FIN
from nfq_tcpcrypt.core.errors import MalformedSegment
from nfq_tcpcrypt.core.events import SessionAborted
from nfq_tcpcrypt.core.flow import Direction
from nfq_tcpcrypt.core.wire.ip import serialize_ip_header
from nfq_tcpcrypt.core.wire.tcp import (
    parse_options,
    parse_segment,
    serialize_segment,
    timestamp,
    usual_options,
    usual_tsval,
)
from nfq_tcpcrypt.lab.tcpmodel import A_IP, Channel, Pair, seeded_config

from .test_wire_checksum import ip_checksum_ok, tcp_checksum_ok

_V4: struct.Struct = struct.Struct("!BBHHHBBH4s4s")
_TCP: struct.Struct = struct.Struct("!HHIIBBHHH")


def _v4_packet(rng: random.Random, options: bytes, payload: bytes, offset_low: int = 0) -> bytes:
    """An IPv4 packet with random TOS, identification, DF, TTL and TCP fields (checksums as they fall:
    parsing without verification must read them as they are)."""
    total = 40 + len(options) + len(payload)
    ip = _V4.pack(0x45, rng.randrange(256), total, rng.randrange(65536), rng.choice((0, 0x4000)),
                  rng.randrange(1, 256), 6, rng.randrange(65536), rng.randbytes(4), rng.randbytes(4))
    offset = ((20 + len(options)) // 4) << 4 | offset_low
    tcp = _TCP.pack(rng.randrange(65536), rng.randrange(65536), rng.randrange(1 << 32), rng.randrange(1 << 32),
                    offset, rng.randrange(256), rng.randrange(65536), rng.randrange(65536), rng.randrange(65536))
    return ip + tcp + options + payload


@pytest.mark.parametrize("seed", range(4))
def test_parse_reads_every_field_as_struct_does(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(300):
        options = rng.randbytes(rng.choice((0, 4, 12, 40)))
        payload = rng.randbytes(rng.choice((0, 1, 100, 1448)))
        low = rng.randrange(16) if rng.random() < 0.3 else 0  # reserved bits and NS beside the data offset
        packet = _v4_packet(rng, options, payload, low)
        seg = parse_segment(packet)
        sport, dport, seq, ack, _, flags, window, _, urgent = _TCP.unpack_from(packet, 20)
        assert (seg.src, seg.dst) == (packet[12:16], packet[16:20])
        assert (seg.sport, seg.dport, seg.seq, seg.ack, seg.flags, seg.window, seg.urgent) == (
            sport, dport, seq, ack, flags, window, urgent)
        assert (seg.ip_header, seg.options, seg.payload) == (packet[:20], options, payload)
        rebuilt = serialize_segment(seg)  # the header kept as it came, the TCP checksum made anew
        assert rebuilt[:20] == packet[:20] and tcp_checksum_ok(rebuilt)
        if not low:
            assert rebuilt[20:36] == packet[20:36] and rebuilt[38:] == packet[38:]


def test_parse_refuses_what_parse_ip_refuses() -> None:
    rng = random.Random(7)
    packet = _v4_packet(rng, b"", b"x" * 10)
    for at, value in ((2, 0xFF), (3, 0x00), (6, 0x20), (7, 0x01), (9, 17)):  # length, MF, offset, UDP
        broken = bytearray(packet)
        broken[at] = value
        with pytest.raises(MalformedSegment):
            parse_segment(bytes(broken))


@pytest.mark.parametrize("seed", range(3))
def test_new_length_keeps_the_ip_header_fields(seed: int) -> None:
    """A rewritten payload of another length: the option-less IPv4 header and the TCP header packed
    in one call give the same bytes as the general rebuild (serialize_ip_header), checksums valid."""
    rng = random.Random(100 + seed)
    for _ in range(200):
        packet = _v4_packet(rng, rng.choice((b"", rng.randbytes(12))), rng.randbytes(rng.randrange(0, 1500)))
        seg = parse_segment(packet)
        seg.payload = rng.randbytes(rng.randrange(0, 1500))
        if 40 + len(seg.options) + len(seg.payload) == len(packet):
            continue
        rebuilt = serialize_segment(seg)
        tcp_len = len(rebuilt) - 20
        assert rebuilt[:20] == serialize_ip_header(packet[:20], tcp_len)
        assert ip_checksum_ok(rebuilt) and tcp_checksum_ok(rebuilt)
        assert parse_segment(rebuilt, verify_checksum=True).payload == seg.payload


def test_usual_options_and_tsval_by_index() -> None:
    rng = random.Random(3)
    ts_prefix = bytes((1, 1, 8, 10))
    blocks = [b"", ts_prefix + rng.randbytes(8), bytes((1, 1, 8, 9)) + rng.randbytes(8),
              bytes((1, 0, 8, 10)) + rng.randbytes(8), ts_prefix + rng.randbytes(4), rng.randbytes(12)]
    blocks += [ts_prefix + rng.randbytes(8) for _ in range(50)]
    for block in blocks:
        assert usual_options(block) == (not block or (len(block) == 12 and block[:4] == ts_prefix))
        if block and usual_options(block):
            ts = timestamp(parse_options(block))
            assert ts is not None and usual_tsval(block) == ts[0]


class _Counted:
    """Pair.intercept for both engines: which fast path took each FIN (the session's counters
    before and after the packet)."""

    def __init__(self, pair: Pair) -> None:
        self.fins: list[tuple[str, bool]] = []
        for engine in (pair.engine_a, pair.engine_b):
            assert engine is not None
            pair.intercept[engine] = self._hook(engine)

    def _hook(self, engine):  # type: ignore[no-untyped-def]
        def process(packet: bytes, direction: Direction, now: float):  # type: ignore[no-untyped-def]
            sessions = list(engine._sessions.values())
            before = [(s.fast_taken[2], s.tx.fast_data_out) for s in sessions]
            verdict = engine.process(packet, direction, now)
            seg = parse_segment(packet)
            if seg.flags & TCP_FIN and sessions:
                after = [(s.fast_taken[2], s.tx.fast_data_out) for s in sessions]
                way = "in" if direction is Direction.INBOUND else "out"
                self.fins.append((way, after != before))
            return verdict
        return process


def test_fins_take_the_fast_paths_both_ways() -> None:
    pair = Pair(seed=b"fins")
    counted = _Counted(pair)
    pair.open()
    pair.talk(b"q" * 100, b"r" * 300)
    pair.close()
    assert pair.a.peer_fin and pair.b.peer_fin
    ways = {way for way, fast in counted.fins if fast}
    assert ways == {"in", "out"}, counted.fins


class _ForgedFin(Channel):
    """Sets FIN on the third data segment from A, its frame not the last (no FINp), checksum fixed."""

    def __init__(self) -> None:
        super().__init__(0)
        self.seen = 0

    def carry(self, packet: bytes) -> list[tuple[int, bytes]]:
        seg = parse_segment(packet)
        if seg.src == A_IP and len(seg.payload) > 100:
            self.seen += 1
            if self.seen == 3:
                seg.flags |= TCP_FIN
                return [(0, serialize_segment(seg))]
        return [(0, packet)]


def _forged(fast_paths: bool) -> tuple[list[str], bytes, bool, bool]:
    configs = [seeded_config(b"forged-fin" + side, fast_paths=fast_paths) for side in (b"a", b"b")]
    pair = Pair(a_config=configs[0], b_config=configs[1], channel=_ForgedFin())
    pair.open()
    pair.a.write(hashlib.shake_256(b"f").digest(100_000))
    pair.run()
    aborts = [e.reason for e in pair.events(pair.engine_b) if isinstance(e, SessionAborted)]
    return aborts, bytes(pair.b.received), pair.b.was_reset, pair.b.peer_fin


def test_forged_fin_on_a_whole_frame_aborts_as_on_the_general_path() -> None:
    """A FIN on a segment that holds one whole frame without FINp now reaches in_order_in; it aborts
    as on the general path (RFC 8548 §3.7): the same reason, the same bytes delivered, a reset and
    no clean end of file for the application."""
    fast = _forged(True)
    assert fast == _forged(False)
    aborts, received, was_reset, peer_fin = fast
    assert aborts and "finp" in aborts[0]
    assert hashlib.shake_256(b"f").digest(100_000).startswith(received) and was_reset and not peer_fin
