"""The per-packet fast paths change nothing: every wire packet, every packet toward a stack, every
event, session and counter is the same as when the general path handles everything
(docs/architecture.md: A packet's path).

Each run goes twice through two engines between two TCP models, once as the engine runs and once
with the fast paths turned off (Configuration.fast_paths: the general path decides), over channels
that lose, reorder, duplicate and re-segment, with GSO and GRO, so that the fast paths see their
usual case and many of the cases they hand on.
"""

from __future__ import annotations

import hashlib
import os

import pytest

from nfq_tcpcrypt.core.wire.ip import checksum_fold
from nfq_tcpcrypt.core.wire.tcp import new_segment, parse_segment, serialize_segment, timestamp_option
from nfq_tcpcrypt.lab.tcpmodel import Channel, Pair, seeded_config

FAST_PATHS = ("pure_ack_out", "pure_ack_in", "in_order_in")


def _run(seed: int, channel: dict[str, float], gso: int, gro: bool,
         fast_paths: bool) -> tuple[list[bytes], bytes, bytes, list[object], dict[str, int]]:
    configs = [seeded_config(seed.to_bytes(4, "big") + side, fast_paths=fast_paths) for side in (b"a", b"b")]
    pair = Pair(a_config=configs[0], b_config=configs[1], channel=Channel(seed, **channel) if channel else None,
                gso=gso, gro=gro)
    received: list[bytes] = []
    for endpoint_name in ("a", "b"):
        endpoint = getattr(pair, endpoint_name)
        receive = endpoint.receive

        def record(packet: bytes, receive=receive) -> None:  # type: ignore[no-untyped-def]
            received.append(packet)
            receive(packet)

        endpoint.receive = record
    pair.open()
    a_data = hashlib.shake_256(b"a%d" % seed).digest(150_000)
    b_data = hashlib.shake_256(b"b%d" % seed).digest(40_000)
    pair.talk(a_data, b_data)
    pair.close()
    engines = [pair.engine_a, pair.engine_b]
    sessions = [session for engine in engines for session in engine._sessions.values()]  # type: ignore[union-attr]
    hits = {name: sum(session.fast_taken[i] for session in sessions) for i, name in enumerate(FAST_PATHS)}
    hits["new_data_out"] = sum(session.tx.fast_data_out for session in sessions)
    events: list[object] = [repr(e) for engine in engines for e in pair.events(engine)]
    events += [(engine.session_table(), dict(engine.counters)) for engine in engines]  # type: ignore[union-attr]
    return pair.wire + received, bytes(pair.a.received), bytes(pair.b.received), events, hits


@pytest.mark.parametrize(
    "seed, channel, gso, gro",
    [
        (1, {}, 1, False),
        (2, dict(loss=0.02), 1, False),
        (3, dict(loss=0.03, reorder=0.1, dup=0.05, split=0.2), 1, False),
        (4, dict(loss=0.01), 8, True),  # GRO joins frames: in_order_in may see none alone
        (5, dict(reorder=0.2, dup=0.1), 4, True),
        (6, {}, 44, False),  # frames of 44 segments: the receiving engine gets them piece by piece
        (7, dict(loss=0.01, reorder=0.05), 8, False),
    ],
)
def test_fast_paths_change_nothing(seed: int, channel: dict[str, float], gso: int, gro: bool) -> None:
    fast = _run(seed, channel, gso, gro, fast_paths=True)
    hits = fast[4]
    # each fast path took its usual case (the data one may not, when GRO joins frames)
    assert all(n for name, n in hits.items() if name != "in_order_in" or not gro) and any(hits.values()), hits
    general = _run(seed, channel, gso, gro, fast_paths=False)
    assert not any(general[4].values())
    assert fast[1:3] == general[1:3]  # the same bytes reached both stacks
    assert fast[3] == general[3]  # the same events, sessions (counters of bytes, rekeys) and counters
    assert fast[0] == general[0]  # and every packet on the wire and toward a stack was the same


@pytest.mark.parametrize("size", [0, 1, 2, 51, 1448, 9001, 65535, 65536, 70_001])
def test_checksum_fold_of_big_and_small_buffers(size: int) -> None:
    """The fold sums a big buffer in pieces (ip.ones_sum); the sum is the same (RFC 1071)."""
    for data in (os.urandom(size), b"\xff" * size, bytes(size)):
        padded = data + b"\x00" * (size & 1)
        assert checksum_fold(data) == (int.from_bytes(padded, "big") % 0xFFFF or 0xFFFF)


@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("size", [0, 1, 1447, 65_000])
def test_rebuilt_segments_carry_valid_checksums(v6: bool, size: int) -> None:
    """serialize_segment's one fold over addresses and segment gives a checksum the strict parser
    verifies; one flipped bit anywhere in the segment fails it. A parsed packet rebuilt with a
    field changed keeps its IP header (the same length) and gets a new valid checksum."""
    src, dst = (os.urandom(16), os.urandom(16)) if v6 else (os.urandom(4), os.urandom(4))
    payload = os.urandom(size)
    packet = serialize_segment(new_segment(src, dst, 1, 2, 3, 4, 0x18, 5, timestamp_option(6, 7), payload))
    seg = parse_segment(packet, verify_checksum=True)
    assert seg.payload == payload and seg.src == src and seg.dst == dst
    ihl = 40 if v6 else 20
    for at in (ihl + 4, ihl + 16, ihl + 20, len(packet) - 1):
        broken = bytearray(packet)
        broken[at] ^= 0x10
        with pytest.raises(Exception, match="checksum"):
            parse_segment(bytes(broken), verify_checksum=True)
    seg.ack = 0xDEADBEEF
    rebuilt = serialize_segment(seg)
    assert rebuilt[:ihl] == packet[:ihl]
    assert parse_segment(rebuilt, verify_checksum=True).ack == 0xDEADBEEF
