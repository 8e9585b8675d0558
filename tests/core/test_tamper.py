"""Tamper evidence (RFC 8548 §3.6, §3.7): a forged frame or a FIN without FINp aborts the
connection toward both stacks; no forged byte and no clean end of file ever reach an application."""

from __future__ import annotations

import hashlib

from nfq_tcpcrypt.core.constants import TCP_FIN
from nfq_tcpcrypt.core.events import SessionAborted
from nfq_tcpcrypt.core.wire.tcp import parse_segment, serialize_segment
from nfq_tcpcrypt.lab.tcpmodel import A_IP, Channel, Pair


class Tamperer(Channel):
    """Changes the n-th data segment from A (fixing the TCP checksum, as a middlebox would)."""

    def __init__(self, nth: int, how: str) -> None:
        super().__init__(0)
        self.nth, self.how, self.seen = nth, how, 0

    def carry(self, packet: bytes) -> list[tuple[int, bytes]]:
        seg = parse_segment(packet)
        if seg.src == A_IP and len(seg.payload) > 100:
            self.seen += 1
            if self.seen == self.nth:
                if self.how == "flip":
                    body = bytearray(seg.payload)
                    body[50] ^= 0x01
                    seg.payload = bytes(body)
                else:  # "fin": a forged FIN on a data segment
                    seg.flags |= TCP_FIN
                return [(0, serialize_segment(seg))]
        return [(0, packet)]


def _run(channel: Channel) -> tuple[Pair, bytes, list]:
    pair = Pair(seed=b"tamper", channel=channel)
    pair.open()
    data = hashlib.shake_256(b"t").digest(100_000)
    pair.a.write(data)
    pair.run()
    return pair, data, pair.events(pair.engine_a) + pair.events(pair.engine_b)


def test_flipped_ciphertext_bit_aborts_both_ways():
    pair, data, events = _run(Tamperer(5, "flip"))
    aborts = [e for e in events if isinstance(e, SessionAborted)]
    assert aborts and "authentication" in aborts[0].reason
    assert data.startswith(bytes(pair.b.received)) and len(pair.b.received) < len(data)
    assert pair.b.was_reset and pair.a.was_reset
    assert not pair.b.peer_fin


def test_fin_without_finp_aborts():
    pair, data, events = _run(Tamperer(3, "fin"))
    aborts = [e for e in events if isinstance(e, SessionAborted)]
    assert aborts and "finp" in aborts[0].reason
    assert data.startswith(bytes(pair.b.received))
    assert pair.b.was_reset and not pair.b.peer_fin
