"""Rekeying and keep-alive (RFC 8548 §3.8, §3.9)."""

from __future__ import annotations

import hashlib

from nfq_tcpcrypt.core.constants import CONTROL_REKEY, INIT1_MAGIC, INIT2_MAGIC
from nfq_tcpcrypt.core.events import SessionAborted
from nfq_tcpcrypt.core.wire.tcp import parse_segment
from nfq_tcpcrypt.lab.tcpmodel import A_IP, B_IP, Channel, Pair, seeded_config

INIT1, INIT2 = INIT1_MAGIC.to_bytes(4, "big"), INIT2_MAGIC.to_bytes(4, "big")


def _pair(channel=None, **config) -> Pair:
    return Pair(
        a_config=seeded_config(b"ra", **config), b_config=seeded_config(b"rb", **config), channel=channel
    )


def _rekey_frames(pair: Pair, src: bytes) -> int:
    """Frames with the rekey bit seen at the start of a segment from `src` (good enough here:
    one frame per segment without re-segmentation)."""
    seen = set()
    for packet in pair.wire:
        seg = parse_segment(packet)
        if seg.payload[:4] in (INIT1, INIT2):
            continue
        if seg.src == src and seg.payload and seg.payload[0] & CONTROL_REKEY and seg.seq not in seen:
            seen.add(seg.seq)
    return len(seen)


def test_rekey_by_volume_both_directions_with_loss():
    for seed in range(3):
        pair = _pair(Channel(seed, loss=0.02, reorder=0.05), rekey_bytes=20_000)
        pair.open()
        a_data = hashlib.shake_256(b"a%d" % seed).digest(150_000)
        b_data = hashlib.shake_256(b"b%d" % seed).digest(120_000)
        pair.talk(a_data, b_data)
        assert bytes(pair.b.received) == a_data and bytes(pair.a.received) == b_data
        ta, tb = pair.engine_a.session_table()[0], pair.engine_b.session_table()[0]
        # Both sides rekey by volume; a new rekey waits until the peer answered the last one,
        # so with 64 KiB windows a few generations pass, never more than one apart.
        assert ta["rekeys"] >= 2 and tb["rekeys"] >= 2
        assert ta["generation"] == tb["generation"][::-1]
        assert not any(isinstance(e, SessionAborted) for e in pair.events(pair.engine_a))


def test_peer_rekey_is_answered_once():
    pair = _pair(rekey_bytes=10_000)
    pair.open()
    for _ in range(5):  # only A sends data, one rekey's worth per round trip
        pair.a.write(b"x" * 10_001)
        pair.run()
    ta, tb = pair.engine_a.session_table()[0], pair.engine_b.session_table()[0]
    assert ta["generation"][0] == tb["generation"][1] == 5
    # B answered each rekey of A with an empty rekey frame (it has no data to send)
    assert _rekey_frames(pair, B_IP) == tb["generation"][0] == ta["generation"][0]
    assert bytes(pair.b.received) == b"x" * 50_005


def test_keepalive_by_rekey():
    pair = _pair(keepalive=5.0)
    pair.b.listen()
    pair.a.connect(B_IP, 80)
    pair.run(max_time=1.0)
    pair.a.write(b"hello")
    pair.run(max_time=30.0)  # idle: both sides probe every 5 s, and the other answers
    ta, tb = pair.engine_a.session_table()[0], pair.engine_b.session_table()[0]
    assert ta["rekeys"] >= 2 and tb["rekeys"] >= 2
    assert ta["generation"] == tb["generation"][::-1]
    assert _rekey_frames(pair, A_IP) >= 2
    pair.b.write(b"still fine")
    pair.run(max_time=1.0)
    assert bytes(pair.a.received) == b"still fine"
