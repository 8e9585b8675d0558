"""The session table at high connection rates: ended sessions make room, and a 4-tuple that comes
round again opens anew without letting the old connection's bytes through (README: Security model)."""

from __future__ import annotations

from nfq_tcpcrypt.core.constants import TCP_ACK, TCP_PSH, TCP_SYN
from nfq_tcpcrypt.core.flow import Direction
from nfq_tcpcrypt.core.verdict import Action
from nfq_tcpcrypt.core.wire.tcp import new_segment, parse_segment, serialize_segment
from nfq_tcpcrypt.lab.tcpmodel import A_IP, B_IP, Pair, seeded_config


def _plaintext_on_wire(pair: Pair, data: bytes) -> bool:
    return any(data in parse_segment(p).payload for p in pair.wire)


def _linger_out(pair: Pair, seconds: float = 200.0) -> None:
    pair.now += seconds
    for engine in (pair.engine_a, pair.engine_b):
        assert engine is not None
        engine.handle_timer(pair.now)


def test_ended_sessions_make_room_for_new_encrypted_connections():
    """A table full of closed, lingering sessions: each new connection evicts the oldest of them
    (leaving a tombstone) and is encrypted, never passed plain for want of room."""
    pair = Pair(seed=b"table", a_config=seeded_config(b"ta", max_sessions=3),
                b_config=seeded_config(b"tb", max_sessions=3))
    pair.open()
    pair.talk(b"first", b"ok")
    pair.close()
    for k in range(6):
        request = b"request %d " % k * 4
        pair.new_connection(20000 + k, 80)
        pair.talk(request, b"answer %d" % k)
        pair.close()
        assert bytes(pair.b.received) == request and not _plaintext_on_wire(pair, request)
    for engine in (pair.engine_a, pair.engine_b):
        assert engine is not None
        assert len(engine.session_table()) <= 3
        assert engine.counters["evicted_ended"] == 4 and engine.counters["table_full"] == 0
        assert len(engine.tombstones) == 4  # the evicted ones fail closed like expired ones
        assert all(s["state"] == "closed" for s in engine.session_table())


def test_live_keyed_sessions_are_never_evicted():
    """Only ended sessions go: with every session live and keyed, a new connection passes plain
    (counted), as before."""
    pair = Pair(seed=b"live", b_config=seeded_config(b"lb", max_sessions=1))
    pair.open()
    pair.talk(b"live one", b"ok")
    pair.new_connection(20001, 80)
    pair.talk(b"second", b"ok")
    assert pair.engine_b is not None
    assert pair.engine_b.counters["table_full"] >= 1 and pair.engine_b.counters["evicted_ended"] == 0


def test_peer_reopens_a_tuple_after_its_tombstone():
    """The client's port comes round again after the session lingered out: the new connection on
    the same 4-tuple is encrypted on both ends (its SYN is not dropped by the old tombstone)."""
    pair = Pair(seed=b"reuse")
    pair.open()
    pair.talk(b"old request", b"old answer")
    pair.close()
    _linger_out(pair)
    assert pair.engine_b is not None and len(pair.engine_b.tombstones) == 1
    pair.new_connection(40000, 80, isn_a=0x12345678, isn_b=0x23456789)  # Pair.open's 4-tuple
    pair.talk(b"new request" * 3, b"new answer" * 3)
    assert bytes(pair.b.received) == b"new request" * 3 and bytes(pair.a.received) == b"new answer" * 3
    assert not _plaintext_on_wire(pair, b"new request") and not _plaintext_on_wire(pair, b"new answer")
    assert len(pair.engine_b.tombstones) == 0  # our stack's SYN-ACK showed it held no old connection
    assert pair.engine_b.session_table()[0]["state"] in ("encrypting", "closing", "closed")


def test_a_syn_on_a_tombstone_does_not_open_the_old_connection():
    """A SYN from the wire (forged, or a peer that opens anew) on the 4-tuple of a dead encrypted
    connection our stack may still hold: until our stack answers it with a SYN-ACK, our stack's
    other packets of that 4-tuple are reset and dropped (never plaintext on the wire), and the
    wire's other packets are dropped (never unauthenticated bytes to our stack)."""
    pair = Pair(seed=b"tomb", b_config=seeded_config(b"tomb-b", idle_timeout=5.0))
    pair.open()
    pair.talk(b"hello", b"world")
    _linger_out(pair, 10.0)  # idle: the session left the table, both stacks still hold the connection
    engine = pair.engine_b
    assert engine is not None and engine.session_table() == [] and len(engine.tombstones) == 1
    a_port, b_port = pair.a.port, pair.b.port
    syn = new_segment(A_IP, B_IP, a_port, b_port, 0x0BAD0000, 0, TCP_SYN, 1000, b"\x02\x04\x05\xb4")
    verdict = engine.process(serialize_segment(syn), Direction.INBOUND, pair.now)
    assert verdict.action is Action.ACCEPT  # a new connection may start here
    # Our stack still holds the old connection and writes to it: reset, dropped, nothing leaves.
    secret = b"old connection's plaintext"
    write = new_segment(B_IP, A_IP, b_port, a_port, 0x1000, 0x2000, TCP_ACK | TCP_PSH, 1000, b"", secret)
    verdict = engine.process(serialize_segment(write), Direction.OUTBOUND, pair.now)
    assert verdict.action is Action.DROP
    injected = engine.segments_to_inject()
    assert injected and all(parse_segment(i.packet).is_rst for i in injected)
    assert not any(secret in i.packet for i in injected)
    # Data from the wire on that 4-tuple before our stack's SYN-ACK: dropped.
    forged = new_segment(A_IP, B_IP, a_port, b_port, 0x0BAD0001, 0x1000, TCP_ACK | TCP_PSH, 1000, b"", b"forged")
    assert engine.process(serialize_segment(forged), Direction.INBOUND, pair.now).action is Action.DROP
    assert engine.counters["fail_closed_reset"] >= 1 and engine.counters["fail_closed_dropped"] >= 1
    assert len(engine.tombstones) == 1


def test_a_reopened_tuple_whose_new_session_goes_fails_closed_again():
    """The session the peer's SYN opened on a tombstoned 4-tuple leaves the table before our stack
    answered (here: a reload excludes the port and the peer's next SYN is left alone): the
    tombstone decides again, so our stack's write to its old connection still never leaves."""
    from dataclasses import replace

    from nfq_tcpcrypt.core.config import PolicyRule

    pair = Pair(seed=b"tomb2", b_config=seeded_config(b"tomb2-b", idle_timeout=5.0))
    pair.open()
    pair.talk(b"hello", b"world")
    _linger_out(pair, 10.0)
    engine = pair.engine_b
    assert engine is not None and len(engine.tombstones) == 1
    a_port, b_port = pair.a.port, pair.b.port
    syn = new_segment(A_IP, B_IP, a_port, b_port, 0x0BAD0000, 0, TCP_SYN, 1000, b"\x02\x04\x05\xb4")
    assert engine.process(serialize_segment(syn), Direction.INBOUND, pair.now).action is Action.ACCEPT
    assert len(engine.session_table()) == 1
    engine.config = replace(engine.config, policies=(PolicyRule(port=b_port, exclude=True),))
    again = new_segment(A_IP, B_IP, a_port, b_port, 0x0BAD1000, 0, TCP_SYN, 1000, b"\x02\x04\x05\xb4")
    assert engine.process(serialize_segment(again), Direction.INBOUND, pair.now).action is Action.ACCEPT
    assert engine.session_table() == []
    secret = b"old connection's plaintext"
    write = new_segment(B_IP, A_IP, b_port, a_port, 0x1000, 0x2000, TCP_ACK | TCP_PSH, 1000, b"", secret)
    assert engine.process(serialize_segment(write), Direction.OUTBOUND, pair.now).action is Action.DROP
    assert not any(secret in i.packet for i in engine.segments_to_inject())


def test_a_big_table_is_swept_in_steps_and_nothing_escapes_the_sweep():
    """The sweep looks at SWEEP_SLICE sessions per step, the next step due at once (packets that
    wait go between steps); every session past its time goes, and one opened while a sweep is
    under way is swept in a later one."""
    from nfq_tcpcrypt.core.engine import SWEEP_SLICE, Engine
    from nfq_tcpcrypt.core.events import SessionExpired

    engine = Engine(seeded_config(b"sweep"))
    embryonic = engine.config.embryonic_timeout

    def syn(port: int, now: float) -> None:
        packet = serialize_segment(new_segment(A_IP, B_IP, port, 80, 1000, 0, TCP_SYN, 65535))
        assert engine.process(packet, Direction.OUTBOUND, now).action is Action.ACCEPT

    count = 2 * SWEEP_SLICE + 20
    for k in range(count):
        syn(10000 + k, 0.0)
    assert len(engine.session_table()) == count
    now = embryonic + 1.0
    assert engine.get_timer() is not None and engine.get_timer() <= now
    steps = 0
    while (at := engine.get_timer()) is not None and at <= now:
        before = len(engine.session_table())
        engine.handle_timer(now)
        assert before - len(engine.session_table()) <= SWEEP_SLICE
        steps += 1
        if steps == 1:
            syn(30000, now)  # opened while the sweep is under way
    assert steps == 3 and len(engine.session_table()) == 1  # the late one is not due yet
    expired = []
    while (event := engine.next_event()) is not None:
        expired += [event] if isinstance(event, SessionExpired) else []
    assert len(expired) == count
    later = engine.get_timer()
    assert later is not None and later <= now + embryonic + 1.0  # its own expiry is scheduled
    engine.handle_timer(now + embryonic + 1.0)
    while (at := engine.get_timer()) is not None and at <= now + embryonic + 1.0:
        engine.handle_timer(now + embryonic + 1.0)
    assert engine.session_table() == []


def test_sessions_leaving_the_table_are_freed_without_the_cycle_collector():
    """Swept (linger), evicted and port-reuse-replaced sessions hold no reference cycle
    (Session.forget): reference counting frees them at once, and the collector's passes, whose
    cost grows with every live object, find no session garbage."""
    import gc

    pair = Pair(seed=b"table-gc", a_config=seeded_config(b"ga", max_sessions=3),
                b_config=seeded_config(b"gb", max_sessions=3))
    pair.open()
    pair.close()
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for k in range(8):  # beyond max_sessions: ended sessions are evicted
            pair.new_connection(20000 + k % 5, 80)  # ports come round again: replaced sessions
            pair.talk(b"request", b"answer")
            pair.close()
        _linger_out(pair)
        pair.new_connection(21000, 80)  # a sweep has run: the table holds this one only
        pair.talk(b"request", b"answer")
        for engine in (pair.engine_a, pair.engine_b):
            assert engine is not None
            assert len(engine.session_table()) == 1
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        kinds = {type(o).__name__ for o in gc.garbage}
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        if enabled:
            gc.enable()
    assert not kinds & {"Session", "StreamTranslator", "Timers", "SendStream", "RecvStream"}, kinds
