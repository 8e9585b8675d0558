"""The packets of a fresh key exchange on the wire: nothing sent twice (RFC 8548 §3.3)."""

from __future__ import annotations

from nfq_tcpcrypt.core.constants import TCP_ACK
from nfq_tcpcrypt.core.wire.tcp import parse_segment
from nfq_tcpcrypt.lab.tcpmodel import A_IP, B_IP, Pair, seeded_config


def _exchange(client_writes_first: bool) -> Pair:
    """A fresh connection whose client writes its request at once (before Init2 arrives, as a
    real client does right after connect) or only after the handshake, then one answer."""
    pair = Pair(seed=b"hs", a_config=seeded_config(b"hs-a", resume=False),
                b_config=seeded_config(b"hs-b", resume=False))
    pair.b.listen()
    pair.a.connect(B_IP, 80)
    if client_writes_first:
        pair.a.write(b"?")
    pair.run()
    if not client_writes_first:
        pair.a.write(b"?")
        pair.run()
    pair.b.write(b"!")
    pair.run()
    assert bytes(pair.b.received) == b"?" and bytes(pair.a.received) == b"!"
    return pair


def _repeated_acks(pair: Pair) -> list[str]:
    """Pure ACKs that follow a segment of the same sender carrying the same acknowledgment,
    window and options: a duplicate ACK that says nothing new."""
    found = []
    last: dict[bytes, tuple[int, int, bytes]] = {}
    for packet in pair.wire:
        seg = parse_segment(packet)
        key = (seg.ack, seg.window, seg.options)
        if seg.flags == TCP_ACK and not seg.payload and last.get(seg.src) == key:
            found.append(f"{'A' if seg.src == A_IP else 'B'} ack {seg.ack}")
        last[seg.src] = key
    return found


def test_no_repeated_ack_after_the_init_messages():
    """B's Init2 already acknowledges Init1, and A's first frame (the request its stack wrote
    before the keys existed) already acknowledges Init2: neither is followed by a pure ACK."""
    for first in (True, False):
        pair = _exchange(first)
        assert _repeated_acks(pair) == [], first
        assert pair.engine_a is not None and pair.engine_b is not None
    assert pair.engine_b.counters["repeated_acks_dropped"] == 1


def test_the_init_message_is_still_acknowledged_when_nothing_else_does():
    """Without a request held before the keys, A's only acknowledgment of Init2 is its pure ACK:
    it goes out."""
    pair = _exchange(False)
    segments = [parse_segment(p) for p in pair.wire]
    init2 = next(s for s in segments if s.src == B_IP and len(s.payload) == 74)
    assert any(s.src == A_IP and s.ack == (init2.seq + 74) & 0xFFFFFFFF for s in segments)


def test_no_init_retransmission_timer_left_once_the_keys_exist():
    """A's Init1 is acknowledged by the segment that brings Init2, read before the keys exist: the
    retransmission timer goes with the keys, not with some later ACK (which may never come now)."""
    from nfq_tcpcrypt.core.timers import Timer

    pair = Pair(seed=b"hs", a_config=seeded_config(b"hs-a", resume=False),
                b_config=seeded_config(b"hs-b", resume=False))
    pair.b.listen()
    pair.a.connect(B_IP, 80)
    pair.run(max_time=0.0)  # the handshake's packets only, no timer fires, nothing written after
    for engine in (pair.engine_a, pair.engine_b):
        assert engine is not None
        session = next(iter(engine._sessions.values()))
        assert session.keys_ready and Timer.KEX not in session._timers, session.flow


def _watch_b(pair: Pair, idle: bool) -> list[str]:
    """Host B's engine, recording each step that leaves a session's keys due (Init2 sent, keys
    not derived yet) and what derives them next: B's idle point (`idle`: Engine.prepare after
    every packet, as the daemon's loop runs it while no packet waits), or a packet either way."""
    engine = pair.engine_b
    assert engine is not None
    seen: list[str] = []

    def process(packet, direction, now, _real=engine.process):  # type: ignore[no-untyped-def]
        due = [s for s in engine._sessions.values() if s.keys_due]
        verdict = _real(packet, direction, now)
        seen.extend(f"{direction.value} packet" for s in due if s.keys_ready)
        for session in engine._sessions.values():
            if session.keys_due:
                assert not session.keys_ready and session.send.prefix[:4] == bytes.fromhex("097105e0")
                assert session.tx.kex_tries == 1  # Init2 went out in this very step
                seen.append("due")
        while idle and engine.prepare_wanted(now):
            due = [s for s in engine._sessions.values() if s.keys_due]
            engine.prepare(now)
            seen.extend("idle point" for s in due if s.keys_ready)
        return verdict

    pair.intercept[engine] = process
    return seen


def test_host_b_sends_init2_before_it_derives_its_keys():
    """B answers Init1 with Init2 at once and derives ss[0] and the keys after it (RFC 8548 §3.3:
    nothing can use them before A has Init2): at its idle point, else with the session's next
    packet. Both ways, both ends agree on the session and the data arrives."""
    for idle, derived_by in ((True, "idle point"), (False, "inbound packet")):
        pair = Pair(seed=b"hs", a_config=seeded_config(b"hs-a", resume=False),
                    b_config=seeded_config(b"hs-b", resume=False))
        seen = _watch_b(pair, idle)
        pair.b.listen()
        pair.a.connect(B_IP, 80)
        pair.run()
        pair.a.write(b"?")
        pair.b.write(b"!")
        pair.run()
        assert seen == ["due", derived_by], (idle, seen)
        assert bytes(pair.b.received) == b"?" and bytes(pair.a.received) == b"!"
        a, b = (next(iter(e.session_table())) for e in (pair.engine_a, pair.engine_b))  # type: ignore[union-attr]
        assert a["session_id"] == b["session_id"] and a["state"] == b["state"] == "encrypting"
        assert _repeated_acks(pair) == []


def test_keys_due_are_derived_before_our_stack_data_is_framed():
    """B's stack writes while B's keys are still due (before any packet from A after Init1):
    the keys come first, and the data leaves framed after Init2, never in plaintext."""
    from nfq_tcpcrypt.core.constants import FRAME_OVERHEAD, TCP_PSH
    from nfq_tcpcrypt.core.flow import Direction
    from nfq_tcpcrypt.core.wire.tcp import serialize_segment

    pair = Pair(seed=b"hs", a_config=seeded_config(b"hs-a", resume=False),
                b_config=seeded_config(b"hs-b", resume=False))
    engine = pair.engine_b
    assert engine is not None
    synack: list = []
    sent: list[bytes] = []

    def process(packet, direction, now, _real=engine.process):  # type: ignore[no-untyped-def]
        verdict = _real(packet, direction, now)
        seg = parse_segment(packet)
        if direction is Direction.OUTBOUND and seg.is_syn:
            synack.append(seg)
        session = next(iter(engine._sessions.values()))
        if not sent and session.keys_due:
            data = synack[0]
            data.seq, data.flags, data.payload = data.seq + 1, TCP_ACK | TCP_PSH, b"banner"
            out = engine.process(serialize_segment(data), Direction.OUTBOUND, now)
            assert session.keys_ready and not session.keys_due
            sent.append(out.packet if out.packet is not None else b"")
        return verdict

    pair.intercept[engine] = process
    pair.b.listen()
    pair.a.connect(B_IP, 80)
    pair.run(max_time=0.0)
    framed = parse_segment(sent[0])
    assert b"banner" not in sent[0] and len(framed.payload) == len(b"banner") + FRAME_OVERHEAD
    assert framed.seq == (synack[0].seq + 74) & 0xFFFFFFFF  # the frame follows Init2 (74 bytes)


def test_keys_due_are_never_derived_for_a_connection_reset_meanwhile():
    """The peer resets the connection between B's Init2 and B's idle point: B derives nothing for
    it (no keys, no SessionEstablished), and its keys due are gone."""
    from nfq_tcpcrypt.core.constants import TCP_RST
    from nfq_tcpcrypt.core.events import SessionEstablished
    from nfq_tcpcrypt.core.flow import Direction
    from nfq_tcpcrypt.core.wire.tcp import serialize_segment

    pair = Pair(seed=b"hs", a_config=seeded_config(b"hs-a", resume=False),
                b_config=seeded_config(b"hs-b", resume=False))
    engine = pair.engine_b
    assert engine is not None
    checked: list[str] = []

    def process(packet, direction, now, _real=engine.process):  # type: ignore[no-untyped-def]
        verdict = _real(packet, direction, now)
        seg = parse_segment(packet)
        if not checked and seg.payload[:4] == bytes.fromhex("15101a0e"):  # the Init1 step
            session = next(iter(engine._sessions.values()))
            assert session.keys_due
            seg.seq += len(seg.payload)  # exactly B's next expected wire byte: taken (RFC 5961 §3.2)
            seg.payload, seg.flags = b"", TCP_RST | TCP_ACK
            engine.process(serialize_segment(seg), Direction.INBOUND, now)
            assert session.state.value == "closed"
            while engine.prepare_wanted(now):
                engine.prepare(now)
            assert not session.keys_due and not session.keys_ready and session.session_id is None
            checked.append("reset")
        return verdict

    pair.intercept[engine] = process
    pair.b.listen()
    pair.a.connect(B_IP, 80)
    pair.run(max_time=0.0)
    assert checked == ["reset"]
    assert not [e for e in pair.events(engine) if isinstance(e, SessionEstablished)]
