"""Malformed and hostile input at the engine: each gets the RFC's answer (fall back,
drop, or abort with resets both ways), never an exception and never a byte of a bad frame."""

from __future__ import annotations

import struct

import pytest

from nfq_tcpcrypt.core.constants import Tep
from nfq_tcpcrypt.core.events import FellBackToPlain, SessionAborted, SessionEstablished
from nfq_tcpcrypt.core.wire.tcp import parse_options, parse_segment, serialize_options, serialize_segment
from nfq_tcpcrypt.lab.tcpmodel import A_IP, Channel, Pair, seeded_config

INIT1 = bytes.fromhex("15101a0e")
INIT2 = bytes.fromhex("097105e0")


class Rewriter(Channel):
    """Rewrites the first packet that `match` accepts with `change` (checksums fixed)."""

    def __init__(self, match, change) -> None:
        super().__init__(0)
        self.match, self.change, self.done = match, change, False

    def carry(self, packet):
        seg = parse_segment(packet)
        if not self.done and self.match(seg):
            self.done = True
            self.change(seg)
            return [(0, serialize_segment(seg))]
        return [(0, packet)]


def _run(channel: Channel, **config) -> tuple[Pair, list]:
    pair = Pair(a_config=seeded_config(b"ma", **config), b_config=seeded_config(b"mb", **config), channel=channel)
    pair.open()
    pair.talk(b"secret request" * 100, b"secret reply" * 100)
    return pair, pair.events(pair.engine_a) + pair.events(pair.engine_b)


def _payload_edit(prefix: bytes, edit):
    def change(seg):
        seg.payload = edit(bytearray(seg.payload))
    return (lambda seg: seg.payload[:4] == prefix), change


def _aborted(pair: Pair, events: list, words: str) -> None:
    aborts = [e.reason for e in events if isinstance(e, SessionAborted)]
    assert aborts and words in aborts[0], aborts
    assert pair.a.was_reset and pair.b.was_reset
    assert b"secret" not in bytes(pair.a.received) + bytes(pair.b.received)


def _set(at: int, value: bytes):
    def edit(data: bytearray) -> bytes:
        data[at : at + len(value)] = value
        return bytes(data)
    return edit


@pytest.mark.parametrize(
    "name, prefix, edit, words",
    [
        ("init1 bad magic", INIT1, _set(0, b"\x00\x00\x00\x00"), "bad init message"),
        ("init1 length too small", INIT1, _set(4, struct.pack("!I", 20)), "malformed init message"),
        ("init1 length too large", INIT1, _set(4, struct.pack("!I", 1 << 20)), "out of range"),
        ("init1 no ciphers", INIT1, _set(8, b"\x00"), "malformed init message"),
        ("init1 low-order point", INIT1, lambda d: bytes(d[:-32]) + bytes(32), "peer public key"),
        # Bytes after Init1 in its segment: B derives its keys at once instead of after its Init2.
        ("init1 low-order point, more after it", INIT1, lambda d: bytes(d[:-32]) + bytes(32) + b"\x00" * 24,
         "peer public key"),
        ("init2 cipher not offered", INIT2, _set(8, b"\x00\x10"), "did not offer"),
        ("init2 bad magic", INIT2, _set(0, b"\x01\x02\x03\x04"), "bad init message"),
    ],
)
def test_bad_init_messages_abort(name, prefix, edit, words):
    pair, events = _run(Rewriter(*_payload_edit(prefix, edit)))
    _aborted(pair, events, words)


def test_bad_p256_point_aborts():
    def edit(data: bytearray) -> bytes:
        data[-33:] = b"\x02" + b"\xff" * 32  # x beyond the field: not a point
        return bytes(data)
    pair, events = _run(Rewriter(*_payload_edit(INIT1, edit)), teps=(Tep.P256,))
    _aborted(pair, events, "peer public key")


def test_ignored_trailer_is_parsed_and_bound_by_the_keys():
    # B skips Init1's `ignored` bytes (RFC 8548 §4.1) and completes the exchange; since Init1 as
    # received enters ss[0], a middlebox that appended them is caught by the first frame's tag.
    def edit(data: bytearray) -> bytes:
        grown = bytes(data) + b"future extension"
        return grown[:4] + struct.pack("!I", len(grown)) + grown[8:]
    pair, events = _run(Rewriter(*_payload_edit(INIT1, edit)))
    assert sum(isinstance(e, SessionEstablished) for e in events) == 2
    aborts = [e.reason for e in events if isinstance(e, SessionAborted)]
    assert aborts and "failed authentication" in aborts[0]
    assert b"secret" not in bytes(pair.a.received) + bytes(pair.b.received)


def test_short_clen_aborts():
    def match(seg):
        return seg.src == A_IP and len(seg.payload) > 100 and seg.payload[:4] != INIT1
    def change(seg):
        seg.payload = b"\x00\x00\x05" + seg.payload[3:]  # clen 5 < tag + flags
    pair, events = _run(Rewriter(match, change))
    aborts = [e.reason for e in events if isinstance(e, SessionAborted)]
    assert aborts and "failed authentication" in aborts[0]
    assert pair.b.was_reset and bytes(pair.b.received) == b""


def test_third_ack_without_eno_falls_back():
    def match(seg):
        return seg.src == A_IP and not seg.is_syn
    def change(seg):
        seg.options = serialize_options([(k, raw) for k, raw in parse_options(seg.options) if k not in (1, 69)])
        seg.payload = b""  # as if A had fallen back: no ENO, no Init1
    pair, events = _run(Rewriter(match, change))
    assert any(isinstance(e, FellBackToPlain) and "no eno" in e.reason for e in events)


def test_two_eno_options_in_a_syn_count_as_none():
    def match(seg):
        return seg.is_syn and not seg.is_ack
    def change(seg):
        seg.options = serialize_options(parse_options(seg.options) + [(69, b"\x45\x03\x24")])
    pair, events = _run(Rewriter(match, change))
    assert any(isinstance(e, FellBackToPlain) and "several eno options" in e.reason for e in events)
    assert bytes(pair.b.received) == b"secret request" * 100  # plain TCP still works


def test_a_bad_init1_key_found_at_host_bs_idle_point_aborts():
    """Host B derives its keys after its Init2, at its idle point (Engine.prepare) when no packet
    comes first: a low-order point found there aborts the same way, resets both ways at once."""
    pair = Pair(a_config=seeded_config(b"ma"), b_config=seeded_config(b"mb"),
                channel=Rewriter(*_payload_edit(INIT1, lambda d: bytes(d[:-32]) + bytes(32))))
    engine = pair.engine_b
    assert engine is not None
    found: list[bool] = []

    def process(packet, direction, now, _real=engine.process):  # type: ignore[no-untyped-def]
        verdict = _real(packet, direction, now)
        due = any(s.keys_due for s in engine._sessions.values())
        while engine.prepare_wanted(now):
            engine.prepare(now)
        if due:
            found.append(any(s.state.value == "aborted" for s in engine._sessions.values()))
        return verdict

    pair.intercept[engine] = process
    pair.open()
    pair.talk(b"secret request" * 100, b"secret reply" * 100)
    assert found == [True]
    _aborted(pair, pair.events(pair.engine_a) + pair.events(engine), "peer public key")
