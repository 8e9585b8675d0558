"""Hostile peers and on-path attackers against a live encrypted connection (README: Security model).

An attacker who knows the 4-tuple forges segments toward B's engine as if from A. Whatever it
sends, no byte of the connection may leave in plaintext and no forged byte may reach B's stack.
"""

from __future__ import annotations

import os

import pytest

from nfq_tcpcrypt.core.constants import TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN, Role
from nfq_tcpcrypt.core.flow import Direction
from nfq_tcpcrypt.core.verdict import DROP, Action
from nfq_tcpcrypt.core.wire.tcp import new_segment, parse_segment, serialize_segment
from nfq_tcpcrypt.lab.tcpmodel import A_IP, B_IP, MASK, Channel, Endpoint, Pair, seeded_config


def _live(seed: bytes = b"attack", **b_config) -> Pair:  # type: ignore[no-untyped-def]
    pair = Pair(seed=seed, b_config=seeded_config(seed + b"b", **b_config) if b_config else None)
    pair.open()
    pair.talk(b"hello from a" * 100, b"hello from b" * 100)
    return pair


def _last_wire(pair: Pair, src: bytes):  # type: ignore[no-untyped-def]
    return next(parse_segment(p) for p in reversed(pair.wire) if parse_segment(p).src == src)


def _forge(pair: Pair, flags: int, seq: int, ack: int = 0, payload: bytes = b"", options: bytes = b"") -> list:
    """A segment from A's address to B's engine; returns what reached B's stack."""
    seg = new_segment(A_IP, B_IP, pair.a.port, pair.b.port, seq & MASK, ack & MASK, flags, 1000, options, payload)
    verdict = pair.engine_b.process(serialize_segment(seg), Direction.INBOUND, pair.now)
    delivered = []
    if verdict.action is Action.ACCEPT:
        delivered.append(verdict.packet or serialize_segment(seg))
    for injection in pair.engine_b.segments_to_inject():
        if injection.direction is Direction.INBOUND:
            delivered.append(injection.packet)
        else:
            pair.wire.append(injection.packet)
    for packet in delivered:
        pair.b.receive(packet)
    return delivered


def test_a_packet_the_codec_refuses_never_passes_on_an_encrypted_connection():
    """A packet our codecs refuse but a host's stack may take (an IPv6 extension header before
    TCP, RFC 8200 §4): on an encrypted connection (its session, or conntrack's mark) it is dropped,
    never passed on with its payload untranslated (README: Security model); on a connection we
    know nothing of it passes untouched. Here the refusal is a corrupted checksum."""
    pair = _live()
    last = _last_wire(pair, A_IP)
    seg = new_segment(A_IP, B_IP, pair.a.port, pair.b.port, last.seq, last.ack, TCP_ACK | TCP_PSH, 1000, b"",
                      b"forged plaintext")
    packet = bytearray(serialize_segment(seg))
    packet[-1] ^= 1
    verdict = pair.engine_b.process(bytes(packet), Direction.INBOUND, pair.now)
    counters = pair.engine_b.counters
    assert verdict.action is Action.DROP and counters["malformed_dropped"] == counters["malformed"] == 1

    stranger = new_segment(A_IP, B_IP, 50000, 80, 1, 0, TCP_ACK, 1000, b"", b"plain")
    packet = bytearray(serialize_segment(stranger))
    packet[-1] ^= 1
    verdict = pair.engine_b.process(bytes(packet), Direction.INBOUND, pair.now)
    assert verdict.action is Action.ACCEPT and verdict.packet is None
    assert counters["malformed"] == 2 and counters["malformed_dropped"] == 1
    verdict = pair.engine_b.process(bytes(packet), Direction.INBOUND, pair.now, encrypted=True)
    assert verdict.action is Action.DROP and counters["malformed_dropped"] == 2


def _b_plaintext_on_wire(pair: Pair, secret: bytes) -> bool:
    return any(secret in parse_segment(p).payload for p in pair.wire if parse_segment(p).src == B_IP)


def test_forged_syn_does_not_replace_an_encrypted_session():
    """RFC 5961 §4: a SYN in a synchronized state gets a challenge ACK and changes nothing."""
    pair = _live()
    before = len(pair.wire)
    delivered = _forge(pair, TCP_SYN, 0x12345678)
    assert delivered == []  # the SYN never reaches B's stack
    challenge = [parse_segment(p) for p in pair.wire[before:]]
    assert len(challenge) == 1 and challenge[0].flags == TCP_ACK and not challenge[0].payload
    table = pair.engine_b.session_table()
    assert len(table) == 1 and table[0]["state"] == "encrypting"
    secret = os.urandom(3000)
    pair.talk(b"", secret)
    assert bytes(pair.a.received).endswith(secret)
    assert not _b_plaintext_on_wire(pair, secret[:64])
    # A forged plaintext segment at B's expected plain sequence number is not delivered either.
    got = len(pair.b.received)
    _forge(pair, TCP_ACK | TCP_PSH, pair.b.irs + 1 + got, pair.b.isn + 1 + pair.b.nxt, b"FORGED")
    assert b"FORGED" not in bytes(pair.b.received)


def test_blind_rst_is_dropped_and_in_window_rst_challenged():
    """RFC 5961 §3: only an RST at exactly the next expected wire sequence number resets."""
    pair = _live()
    a_last = _last_wire(pair, A_IP)
    rcv_nxt = (a_last.seq + len(a_last.payload)) & MASK
    # Far outside the window: dropped, no reset, no challenge.
    before = len(pair.wire)
    assert _forge(pair, TCP_RST, rcv_nxt + 0x40000000) == []
    assert len(pair.wire) == before and not pair.b.was_reset
    # Inside the window but not exact: a challenge ACK toward the peer, no reset.
    assert _forge(pair, TCP_RST, rcv_nxt + 100) == []
    assert not pair.b.was_reset
    challenge = [parse_segment(p) for p in pair.wire[before:]]
    assert len(challenge) == 1 and challenge[0].flags == TCP_ACK
    assert challenge[0].ack == rcv_nxt
    assert pair.engine_b.session_table()[0]["state"] == "encrypting"
    pair.talk(b"still", b"alive")
    assert bytes(pair.b.received).endswith(b"still")
    # Exactly the next expected sequence number: the reset is real and reaches B's stack.
    a_last = _last_wire(pair, A_IP)
    rcv_nxt = (a_last.seq + len(a_last.payload)) & MASK
    delivered = _forge(pair, TCP_RST, rcv_nxt)
    assert len(delivered) == 1 and parse_segment(delivered[0]).is_rst and pair.b.was_reset


def _expire_b(pair: Pair, seconds: float) -> None:
    pair.now += seconds
    pair.engine_b.handle_timer(pair.now)


def test_idle_expiry_fails_closed_both_ways():
    """After the idle timeout our stack's next write resets the connection, never leaves in
    plaintext; the peer's late ciphertext never reaches our stack."""
    pair = _live(idle_timeout=5.0)
    _expire_b(pair, 10.0)
    assert pair.engine_b.session_table() == []
    got = len(pair.b.received)
    pair.a.write(b"late frames from a")
    pair.run(max_time=1.0)
    assert len(pair.b.received) == got  # ciphertext without a session is not delivered
    secret = os.urandom(2000)
    pair.b.write(secret)
    pair.run(max_time=5.0)
    assert not _b_plaintext_on_wire(pair, secret[:64])
    assert pair.b.was_reset and pair.a.was_reset  # both ends reset, the peer in wire space
    assert pair.engine_b.counters["fail_closed_reset"] >= 1


def test_encrypted_hint_after_restart_fails_closed():
    """A daemon restarted in the middle of a connection has no session, but conntrack remembers
    the connection was encrypted: our stack is reset, nothing leaves in plaintext."""
    pair = _live()
    fresh = type(pair.engine_b)(seeded_config(b"restarted"))
    process = fresh.process
    pair.engine_b = fresh
    pair.intercept[fresh] = lambda packet, direction, now: process(
        packet, direction, now, encrypted=direction is Direction.OUTBOUND
    )
    secret = os.urandom(2000)
    pair.b.write(secret)
    pair.run(max_time=5.0)
    assert not _b_plaintext_on_wire(pair, secret[:64]) and pair.b.was_reset
    # Our stack opening a new connection on the same 4-tuple is not blocked: its SYN gets ENO.
    syn = new_segment(B_IP, A_IP, pair.b.port, pair.a.port, 0x5000, 0, TCP_SYN, 1000, b"\x02\x04\x05\xb4")
    verdict = fresh.process(serialize_segment(syn), Direction.OUTBOUND, pair.now)
    assert verdict.action is Action.ACCEPT and verdict.packet is not None
    assert fresh.session_table()[0]["state"] == "eno-sent"


def test_verdicts_of_an_encrypted_connection_say_so():
    pair = _live()
    a_last = _last_wire(pair, A_IP)
    seg = new_segment(A_IP, B_IP, pair.a.port, pair.b.port, (a_last.seq + len(a_last.payload)) & MASK,
                      a_last.ack, TCP_ACK, 1000)
    verdict = pair.engine_b.process(serialize_segment(seg), Direction.INBOUND, pair.now)
    assert verdict.encrypted
    plain = Pair(seed=b"plain", a_engine=False)
    plain.open()
    plain.talk(b"x", b"y")
    last = _last_wire(plain, A_IP)
    seg = new_segment(A_IP, B_IP, plain.a.port, plain.b.port, last.seq, last.ack, TCP_ACK, 1000)
    assert not plain.engine_b.process(serialize_segment(seg), Direction.INBOUND, plain.now).encrypted


def test_abort_all_resets_encrypted_connections_both_ways():
    """The daemon stops (its rules go): live encrypted connections are reset, not left to go plain."""
    pair = _live()
    assert pair.engine_b.abort_all("daemon stopping", pair.now) == 1
    pair.run(max_time=1.0)
    assert pair.a.was_reset and pair.b.was_reset
    assert pair.engine_b.abort_all("again", pair.now) == 0


def test_a_fault_of_ours_halfway_through_a_packet_resets_the_connection():
    """Whatever breaks inside the engine on an encrypted connection's packet, nothing more of it
    reaches either application: it is reset toward both ends (README: Security model)."""
    pair = _live()
    received = bytes(pair.b.received)
    (session,) = pair.engine_b._sessions.values()  # noqa: SLF001
    # An invariant of ours broken: no key schedule while encrypting, so the peer's next key set
    # (RFC 8548 §3.8) cannot be derived when its rekey frame comes.
    session._schedule = None
    next(iter(pair.engine_a._sessions.values()))._rekey_now(pair.now)
    pair.a.write(b"after the fault" * 10)
    with pytest.raises(Exception):  # noqa: B017 - any fault; the shell drops the packet and counts it
        pair.run(max_time=1.0)
    assert pair.engine_b.counters["internal_errors"] == 1
    assert pair.engine_b.session_table()[0]["state"] == "aborted"
    pair.run(max_time=1.0)
    assert pair.a.was_reset and pair.b.was_reset
    assert bytes(pair.b.received) == received


def test_a_fault_of_ours_before_the_session_takes_the_packet_resets_the_connection():
    """The same where the engine looks at a packet before handing it to its session (the path of
    SYNs, tombstones and reopened 4-tuples): an encrypted connection is reset, not carried on."""
    pair = _live()
    received = bytes(pair.b.received)
    (session,) = pair.engine_a._sessions.values()  # noqa: SLF001
    # An invariant of ours broken: the 4-tuple marked reopened, with no tombstone but a string.
    pair.engine_a._reopened = {session.flow: "not a tombstone"}  # type: ignore[dict-item]  # noqa: SLF001
    pair.a.write(b"after the fault" * 10)
    with pytest.raises(Exception):  # noqa: B017 - any fault; the shell drops the packet and counts it
        pair.run(max_time=1.0)
    assert pair.engine_a.counters["internal_errors"] == 1
    assert pair.engine_a.session_table()[0]["state"] == "aborted"
    pair.engine_a._reopened = {}  # noqa: SLF001
    pair.run(max_time=1.0)
    assert pair.a.was_reset and pair.b.was_reset
    assert bytes(pair.b.received) == received


def _syn_flood(pair: Pair, count: int, with_eno: bool, first_port: int = 20000) -> None:
    template = parse_segment(pair.wire[0])  # A's SYN with our ENO option
    assert template.is_syn and not template.is_ack
    for i in range(count):
        seg = parse_segment(pair.wire[0])
        seg.sport = first_port + i
        seg.seq = (0x1000 * i) & MASK
        if not with_eno:
            seg.options = b"\x02\x04\x05\xb4"
        pair.engine_b.process(serialize_segment(seg), Direction.INBOUND, pair.now)


def test_syn_flood_never_evicts_keyed_sessions_and_leaves_room():
    """Embryonic sessions go first under pressure and expire quickly; keyed ones stay."""
    for with_eno in (True, False):
        pair = _live(max_sessions=8, embryonic_timeout=10.0)
        pair.wire = [p for p in pair.wire]  # keep A's SYN at index 0
        _syn_flood(pair, 100, with_eno)
        table = pair.engine_b.session_table()
        assert len(table) <= 8
        keyed = [s for s in table if s["state"] == "encrypting"]
        assert len(keyed) == 1
        # A genuine connection still gets a session and is encrypted.
        pair.new_connection(41000, 81)
        pair.talk(b"genuine", b"reply")
        assert bytes(pair.b.received) == b"genuine"
        states = sorted(s["state"] for s in pair.engine_b.session_table())
        assert states.count("encrypting") == 2, states
        assert pair.engine_b.counters["evicted_embryonic"] > 0
        # What is left of the flood expires after the embryonic timeout.
        pair.now += 11.0
        pair.engine_b.handle_timer(pair.now)
        assert all(s["state"] == "encrypting" for s in pair.engine_b.session_table())


def test_forged_frag_needed_is_bounded_and_checked_against_data_in_flight():
    """Linux's floor for IPv4 path MTU (min_pmtu 552); a quoted sequence number must lie in
    [snd_una, snd_nxt] of the wire stream (tcp_v4_err), else the report is dropped."""
    from nfq_tcpcrypt.core.wire.icmp import IcmpError, parse_icmp_error, serialize_icmp_error
    from nfq_tcpcrypt.core.wire.ip import new_ip_header

    pair = _live()
    b_last = _last_wire(pair, B_IP)
    router = bytes([10, 77, 0, 254])

    def too_big(seq: int, mtu: int) -> bytes:
        quoted = parse_segment(serialize_segment(b_last))
        quoted.seq = seq & MASK
        header = bytearray(new_ip_header(router, B_IP))
        header[9] = 1
        return serialize_icmp_error(IcmpError(bytes(header), router, B_IP, 3, 4, mtu, serialize_segment(quoted)[:28]))

    session = pair.engine_b._sessions[next(iter(pair.engine_b._sessions))]
    mss = session.wire_mss
    in_flight = b_last.seq + len(b_last.payload)  # snd_nxt = snd_una after everything was acknowledged
    for seq in (in_flight + 0x10000, in_flight - 0x10000, in_flight + 0x80000000):
        verdict = pair.engine_b.process(too_big(seq, 600), Direction.INBOUND, pair.now)
        assert verdict.action is Action.DROP
    assert session.wire_mss == mss and session.pmtu is None
    verdict = pair.engine_b.process(too_big(in_flight, 64), Direction.INBOUND, pair.now)
    assert verdict.action is Action.ACCEPT
    assert session.wire_mss == 552 - 20 - 20 and session.pmtu == 552  # IPv4 and TCP headers
    assert parse_icmp_error(verdict.packet).mtu >= 68
    pair.talk(b"", os.urandom(5000))
    assert max(len(parse_segment(p).payload) for p in pair.wire[-10:] if parse_segment(p).src == B_IP) <= 492


def test_no_secret_in_reprs_and_erased_when_the_session_ends(caplog):  # type: ignore[no-untyped-def]
    """Reprs never show keys or session secrets; an aborted session's keys are zeroed."""
    import logging

    pair = _live()
    session = next(iter(pair.engine_b._sessions.values()))
    keys = list(session._keys.values())
    secrets = [bytes(k.k_ab) for k in keys] + [bytes(k.k_ba) for k in keys]
    secrets.append(bytes(session._schedule._mk))
    cached = next(iter(pair.engine_b.cache._entries.values()))
    secrets.append(bytes(cached.ss))
    offer = cached.resumable()
    secrets.append(offer.ss)
    negotiated = session._negotiated
    for thing in (*keys, session._schedule, cached, offer, negotiated, session, pair.engine_b.config):
        text = repr(thing)
        for secret in secrets:
            assert secret.hex() not in text and repr(secret)[2:-1] not in text, type(thing)
    pair.engine_b.abort_all("test", pair.now)
    assert all(not any(k.k_ab) and not any(k.k_ba) for k in keys)
    assert session._keys == {} and session._schedule is None
    # resume-nonce-len 0 is accepted, with a warning (RFC 8548 §3.5 asks for 8).
    with caplog.at_level(logging.WARNING):
        seeded_config(b"n", resume_nonce_len=0)
    assert any("resume-nonce-len 0" in record.getMessage() for record in caplog.records)


def test_keys_are_erased_when_the_connection_closes_and_late_duplicates_still_pass():
    """A closed session lingers without its keys (zeroed at once, not after the linger); our
    stack's last ACK lost, the peer's repeated FIN frame still reaches our stack as a duplicate,
    which acknowledges it again; nothing is delivered twice, nothing aborted."""
    pair = _live(b"closed-keys")
    sessions = [next(iter(engine._sessions.values())) for engine in (pair.engine_a, pair.engine_b)]
    keys = [k for session in sessions for k in session._keys.values()]
    pair.close()
    for session in sessions:
        assert session.state.value == "closed"
        assert session._keys == {} and session._schedule is None
        assert session.send.cipher is None and session.recv.cipher is None
    assert all(not any(k.k_ab) and not any(k.k_ba) for k in keys)
    fin = next(p for p in reversed(pair.wire) if parse_segment(p).src == A_IP and parse_segment(p).flags & TCP_FIN)
    received = bytes(pair.b.received)
    wire_before = len(pair.wire)
    verdict = pair.engine_b.process(fin, Direction.INBOUND, pair.now)
    assert verdict.action is Action.ACCEPT
    pair.b.receive(verdict.packet if verdict.packet is not None else fin)
    pair.run(max_time=1.0)
    answers = [parse_segment(p) for p in pair.wire[wire_before:] if parse_segment(p).src == B_IP]
    assert answers and not any(seg.flags & TCP_RST for seg in answers)
    assert bytes(pair.b.received) == received and not pair.a.was_reset and not pair.b.was_reset
    assert [session.state.value for session in sessions] == ["closed", "closed"]


def _b_resets_and_the_reset_is_lost(pair: Pair):  # type: ignore[no-untyped-def]
    """B's stack resets the connection; B's session closes, A never sees the reset. Returns B's session."""
    process = pair.engine_a.process

    def lose_resets(packet, direction, now):  # type: ignore[no-untyped-def]
        if direction is Direction.INBOUND and parse_segment(packet).flags & TCP_RST:
            return DROP
        return process(packet, direction, now)

    pair.intercept[pair.engine_a] = lose_resets
    pair.b._emit(TCP_RST | TCP_ACK)
    pair.run(max_time=1.0)
    del pair.intercept[pair.engine_a]
    (session,) = pair.engine_b._sessions.values()
    return session


def test_a_frame_after_the_connection_closed_resets_and_delivers_nothing():
    """B's stack reset the connection (B's session closed, its keys erased) and the reset was
    lost: A's next frame cannot be opened any more, so both ends are reset, nothing delivered."""
    pair = _live(b"closed-frame")
    received = bytes(pair.b.received)
    session = _b_resets_and_the_reset_is_lost(pair)
    assert session.state.value == "closed" and session.recv.cipher is None
    pair.a.write(b"after the reset" * 10)
    pair.run(max_time=1.0)
    assert session.state.value == "aborted" and pair.engine_b.counters["internal_errors"] == 0
    assert pair.a.was_reset and bytes(pair.b.received) == received


def test_forged_out_of_order_piece_does_not_stall_or_abort_the_connection():
    """A forged piece lands beyond a gap ahead of the genuine bytes: the genuine stream still gets
    through whole and authenticated, no forged byte is delivered, the connection is not aborted."""
    pair = Pair(seed=b"forged-ooo")
    pair.open()
    process = pair.engine_b.process
    state = {"held": None, "done": False}

    def intercept(packet, direction, now):  # type: ignore[no-untyped-def]
        seg = parse_segment(packet)
        if direction is Direction.INBOUND and not state["done"] and len(seg.payload) > 1000:
            if state["held"] is None:
                state["held"] = packet  # "lost": the gap
                forged = parse_segment(packet)
                forged.seq = (seg.seq + len(seg.payload)) & MASK
                forged.payload = os.urandom(len(seg.payload))
                process(serialize_segment(forged), direction, now)  # lands beyond the gap first
                from nfq_tcpcrypt.core.verdict import DROP

                return DROP
            state["done"] = True
        return process(packet, direction, now)

    pair.intercept[pair.engine_b] = intercept
    data = os.urandom(60_000)
    pair.talk(data, b"")
    assert bytes(pair.b.received) == data
    assert not pair.b.was_reset and pair.engine_b.session_table()[0]["state"] == "encrypting"


class _StalledReader(Endpoint):
    """A stack whose application reads nothing: a 16 KiB receive buffer that only fills; data
    beyond the window is dropped, as a real stack does."""

    BUFFER = 16 * 1024

    def _emit(self, flags, payload=b"", options=None, seq=None):  # type: ignore[no-untyped-def]
        super()._emit(flags, payload, options, seq)
        if flags & TCP_ACK and not flags & TCP_SYN:
            seg = parse_segment(self.out[-1])
            seg.window = max(self.BUFFER - len(self.received), 0) >> 7
            self.out[-1] = serialize_segment(seg)

    def receive(self, packet):  # type: ignore[no-untyped-def]
        seg = parse_segment(packet)
        room = self.BUFFER - len(self.received)
        start = (seg.seq - self.irs - 1) & MASK
        if seg.payload and start == len(self.received) and len(seg.payload) > room:
            seg.payload = seg.payload[: max(room, 0)]
            seg.flags &= ~0x01
            packet = serialize_segment(seg)
        super().receive(packet)


def test_peer_that_ignores_the_window_cannot_grow_held_plaintext():
    """The plaintext held for our stack (replay, checkpoints) stays within its receive window
    (before our stack's first ACK the engine assumes the largest unscaled window, 64 KiB)."""
    pair = Pair(seed=b"window")
    pair.b = _StalledReader(B_IP, 80, 0x7FFFFFF0)
    pair.open()
    pair.a.WINDOW = 4 << 20  # type: ignore[misc]  # the model sender ignores the peer's window
    pair.a.write(os.urandom(300_000))
    pair.run(max_time=2.0)
    recv = next(iter(pair.engine_b._sessions.values())).recv
    held = sum(len(data) for _, data in recv.replay)
    assert len(pair.b.received) == _StalledReader.BUFFER
    assert held <= 0xFFFF, held  # 300 kB were sent
    assert len(recv.checkpoints) <= 64 and recv.ooo.cost <= 1 << 20


def test_resumption_lookups_cost_no_derivation_and_peers_are_capped(monkeypatch):  # type: ignore[no-untyped-def]
    """A SYN with a bogus resumption identifier costs a dictionary lookup, not HMACs per entry;
    one peer holds at most `per_peer` cached secrets."""
    from nfq_tcpcrypt.core import kex, resumption
    from nfq_tcpcrypt.core.constants import Aead, Tep

    cache = resumption.ResumptionCache(max_entries=4096, per_peer=16)
    peer, other = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
    for i in range(4096):
        cache.store(peer if i % 2 else other, os.urandom(32), Tep.X25519, Aead.AES_128_GCM, Role.A, 0.0)
    assert len(cache) == 32 and {e["peer"] for e in cache.info(0.0)} == {"10.0.0.1", "10.0.0.2"}
    calls = []
    real = kex._digest  # every HMAC of the key schedule (a module global: compiled code looks it up too)
    monkeypatch.setattr(kex, "_digest", lambda *a: calls.append(1) or real(*a))
    # The next secrets of a stored entry are derived once, ahead (fill_one) or by the first
    # lookup of its peer; after that no lookup derives anything.
    assert cache.take_for_answer(peer, int(Tep.X25519), os.urandom(9), 1.0) is None
    assert 0 < len(calls) <= 16 * 2 * (resumption.LOOKAHEAD - 1)
    calls.clear()
    while cache.fill_one():
        pass
    assert 0 < len(calls) <= 16 * 2 * (resumption.LOOKAHEAD - 1) and not cache.wanted  # the other peer's
    calls.clear()
    for _ in range(100):
        assert cache.take_for_answer(peer, int(Tep.X25519), os.urandom(9), 1.0) is None
    assert calls == []
    # A genuine identifier is still found (the original A sent it: its half is bytes 0..8).
    key = cache._by_peer[peer][-1]
    entry = cache._entries[key]
    wanted = entry.resumable(2)
    found = cache.take_for_answer(peer, int(Tep.X25519), wanted.peer_half, 1.0)
    assert found is not None and found.ss == wanted.ss and entry.index == 4


def _policy_pair(rule, a_engine=True, **pair_kwargs):  # type: ignore[no-untyped-def]
    from nfq_tcpcrypt.core.config import PolicyRule

    config = seeded_config(b"policy-b", policies=(PolicyRule(**rule),))
    return Pair(seed=b"policy", b_config=config, a_engine=a_engine, **pair_kwargs)


def test_require_resets_a_connection_that_cannot_be_encrypted():
    """Policy `require`: a peer without ENO gets a reset, not plaintext; counted, both ends reset."""
    for b_opens in (False, True):
        pair = _policy_pair({"port": 80, "require": True}, a_engine=False)
        if b_opens:
            pair.a.listen()
            pair.b.connect(A_IP, 40000)
        else:
            pair.b.listen()
            pair.a.connect(B_IP, 80)
        pair.run(max_time=5.0)
        pair.a.write(b"plaintext from a")
        pair.b.write(b"plaintext from b")
        pair.run(max_time=5.0)
        assert pair.engine_b.counters["refused_plain"] == 1
        assert b"plaintext" not in b"".join(parse_segment(p).payload for p in pair.wire)
        assert pair.a.state in ("closed", "listen") and pair.b.state in ("closed", "listen")
        assert (pair.a.was_reset, pair.b.was_reset) == ((True, True) if b_opens else (True, False))
        assert pair.engine_b.session_table()[0]["state"] == "refused"
    # A peer with ENO is encrypted as usual under the same policy.
    pair = _policy_pair({"network": "10.77.0.0/16", "require": True})
    pair.open()
    pair.talk(b"fine", b"also")
    assert bytes(pair.b.received) == b"fine" and pair.engine_b.session_table()[0]["state"] == "encrypting"


def test_exclude_leaves_connections_untouched():
    pair = _policy_pair({"port": 80, "exclude": True})
    pair.open()
    pair.talk(b"left alone", b"ok")
    assert bytes(pair.b.received) == b"left alone"
    assert pair.engine_b.session_table() == [] and pair.engine_b.counters["excluded"] >= 1
    assert any(b"left alone" in parse_segment(p).payload for p in pair.wire)  # A's engine fell back


def test_require_leaves_a_side_that_speaks_eno_itself_alone():
    """Behind a gateway, a host that negotiates TCP-ENO itself is not reset under `require`."""
    from nfq_tcpcrypt.tools.scapy_layers import eno_option

    pair = _policy_pair({"port": 80, "require": True})
    kind, contents = eno_option(teps=[0x21])
    options = b"\x02\x04\x05\xb4" + bytes((kind, len(contents) + 2)) + contents
    options += b"\x00" * (-len(options) % 4)
    syn = new_segment(B_IP, A_IP, 80, 40000, 0x1000, 0, TCP_SYN, 1000, options)
    verdict = pair.engine_b.process(serialize_segment(syn), Direction.OUTBOUND, 0.0)
    assert verdict.action is Action.ACCEPT and pair.engine_b.counters["refused_plain"] == 0
    assert [p for p in pair.engine_b.segments_to_inject()] == []


def test_after_an_abort_and_its_linger_late_packets_never_pass():
    """An aborted encrypted session leaves the table after its linger: its late packets are
    dropped (and our stack reset), never passed unchanged."""
    pair = _live(session_linger=5.0)
    pair.engine_b.abort_all("test", pair.now)
    pair.run(max_time=1.0)
    _expire_b(pair, 10.0)
    assert pair.engine_b.session_table() == []
    a_last = _last_wire(pair, A_IP)
    assert _forge(pair, TCP_ACK | TCP_PSH, a_last.seq + 5000, a_last.ack, b"late ciphertext") == []
    outbound = new_segment(B_IP, A_IP, pair.b.port, pair.a.port, pair.b.isn + 1 + pair.b.nxt,
                           pair.b.irs + 1 + len(pair.b.received), TCP_ACK | TCP_PSH, 1000, b"", b"plain late write")
    verdict = pair.engine_b.process(serialize_segment(outbound), Direction.OUTBOUND, pair.now)
    assert verdict.action is Action.DROP
    injected = pair.engine_b.segments_to_inject()
    assert [parse_segment(i.packet).is_rst for i in injected] == [True, True]


def test_require_holds_under_table_pressure():
    """A required connection never goes plain for want of a session: a full table refuses its
    SYN, and its packets without a session (evicted while opening) are dropped."""
    from nfq_tcpcrypt.core.config import PolicyRule

    config = seeded_config(b"req-b", policies=(PolicyRule(port=80, require=True),), max_sessions=1)
    pair = Pair(seed=b"req", b_config=config)
    pair.open()
    pair.talk(b"first", b"ok")  # the one keyed session fills the table
    pair.new_connection(41000, 80)
    assert pair.engine_b.counters["refused_plain"] >= 1
    assert pair.b.state == "listen" and pair.a.state != "established"
    late = new_segment(A_IP, B_IP, 42000, 80, 1, 1, TCP_ACK | TCP_PSH, 1000, b"", b"plaintext")
    verdict = pair.engine_b.process(serialize_segment(late), Direction.INBOUND, pair.now)
    assert verdict.action is Action.DROP and pair.engine_b.counters["refused_untracked"] == 1


def test_challenge_acks_are_rate_limited():
    """RFC 5961 §7: a burst of forged SYNs and in-window RSTs earns one challenge ACK per 0.5 s."""
    pair = _live()
    a_last = _last_wire(pair, A_IP)
    rcv_nxt = (a_last.seq + len(a_last.payload)) & MASK
    before = len(pair.wire)
    for i in range(50):
        _forge(pair, TCP_SYN, 0x1000 + i)
        _forge(pair, TCP_RST, rcv_nxt + 10 + i)
    assert len(pair.wire) - before == 1
    pair.now += 0.6
    _forge(pair, TCP_SYN, 0x9999)
    assert len(pair.wire) - before == 2
    assert pair.engine_b.session_table()[0]["state"] == "encrypting" and not pair.b.was_reset


@pytest.mark.parametrize("smaller", ["a", "b"])
def test_our_own_links_mss_bounds_what_we_send(smaller: str) -> None:
    """A peer on a 1500-byte link announces MSS 1460; our stack's link carries 1400 and it announced
    1360. Our segments (resends, Init messages, the rest of a frame that outgrew a segment) must fit
    our link too, whichever side opened: the engine keeps the smaller MSS (RFC 9293 §3.7.1)."""
    pair = Pair(seed=b"small-link")
    getattr(pair, smaller).mss = 1360
    pair.open()
    pair.talk(os.urandom(20000), os.urandom(20000))
    for engine in (pair.engine_a, pair.engine_b):
        session = next(iter(engine._sessions.values()))
        assert session.wire_mss == 1360, (smaller, engine is pair.engine_a)


class _SlowReader(Endpoint):
    """A receiver whose application reads nothing until `read()`, with Linux's window rules: it
    never moves its right edge left, takes in-order data that starts inside its window whole, and
    after a read announces the larger window only once that is at least twice what was left
    (tcp_cleanup_rbuf); otherwise it says nothing until a segment arrives."""

    BUFFER = 160 * 1024
    CLAMP = 72 * 1024  # the most it offers at once (Linux: rcv_ssthresh, which grows slowly)
    SCALE = 7  # the model's SYN announces window scale 7
    consumed = 0
    edge = 0  # offset past the right edge it announced; 0 before its first ACK

    def _free(self) -> int:
        free = min(self.BUFFER - (len(self.received) - self.consumed), self.CLAMP)
        return (max(free, 0) >> self.SCALE) << self.SCALE

    def _emit(self, flags, payload=b"", options=None, seq=None):  # type: ignore[no-untyped-def]
        super()._emit(flags, payload, options, seq)
        seg = parse_segment(self.out[-1])
        if flags & TCP_SYN:
            seg.window = 0xFFFF  # unscaled (RFC 7323 §2.2)
        elif flags & TCP_ACK:
            self.edge = max(self.edge, len(self.received) + self._free())
            seg.window = (self.edge - len(self.received)) >> self.SCALE
        self.out[-1] = serialize_segment(seg)

    def receive(self, packet):  # type: ignore[no-untyped-def]
        seg = parse_segment(packet)
        start = (seg.seq - self.irs - 1) & MASK
        if seg.payload and self.edge and start >= self.edge:
            seg.payload = b""  # beyond the window: dropped, and acknowledged as a duplicate
            seg.flags &= ~0x01
            packet = serialize_segment(seg)
        super().receive(packet)

    def read(self) -> None:
        left = self.edge - len(self.received)
        self.consumed = len(self.received)
        if self._free() >= 2 * left:
            self._emit(TCP_ACK)


class _HonouredWindow(Channel):
    """The wire as a sender that honours b's window would fill it: a's segments that end past the
    right edge b last announced on the wire are not sent (dropped here)."""

    def __init__(self) -> None:
        super().__init__(0)
        self.edge: int | None = None  # b's announced right edge, a sequence number of a's stream

    def carry(self, packet: bytes) -> list[tuple[int, bytes]]:
        seg = parse_segment(packet)
        if seg.src == B_IP and seg.is_ack:
            edge = (seg.ack + (seg.window << (0 if seg.is_syn else _SlowReader.SCALE))) & MASK
            if self.edge is None or (edge - self.edge) & MASK < 1 << 31:
                self.edge = edge
        elif seg.src == A_IP and seg.payload and self.edge is not None:
            if 0 < (seg.seq + len(seg.payload) - self.edge) & MASK < 1 << 31:
                return []
        return [(0, packet)]


@pytest.mark.parametrize("honoured", [False, True], ids=["ignored", "honoured"])
def test_a_frame_across_our_stacks_right_edge_is_taken_whole(honoured: bool) -> None:
    """A peer sends 60 kB frames (super-packets) past b's right edge, or up to the edge b's engine
    announces (`honoured`): b's engine takes and announces the rest of the frame that began inside
    the window and delivers it, so b's stack moves its window again. Taking nothing past the edge
    left the frame unopenable while b's stack, shown nothing of it, had no reason to announce a
    larger window: the connection stalled."""
    pair = Pair(seed=b"edge", gso=42, channel=_HonouredWindow() if honoured else None)
    pair.b = _SlowReader(B_IP, 80, 0x7FFFFFF0, gso=42)
    pair.open()
    pair.a.WINDOW = 4 << 20  # type: ignore[misc]  # the model sender ignores the peer's window
    data = os.urandom(400_000)
    pair.a.write(data)
    pair.run(max_time=1.0)
    assert 0 < len(pair.b.received) < len(data)
    for _ in range(40):
        pair.b.read()
        pair.run(max_time=0.5)
    assert bytes(pair.b.received) == data


def test_keepalive_after_a_reset_sends_nothing():
    """A reset closes the session and erases its keys: its keep-alive (a rekey, RFC 8548 §3.9)
    has nothing to probe and no keys to do it with; it neither faults nor sends."""
    pair = _live(b"closed-keepalive", keepalive=1.0)
    session = _b_resets_and_the_reset_is_lost(pair)
    assert session.state.value == "closed"
    wire_before = len(pair.wire)
    pair.run(max_time=10.0)
    assert pair.engine_b.counters["internal_errors"] == 0 and session.state.value == "closed"
    assert not [p for p in pair.wire[wire_before:] if parse_segment(p).src == B_IP and parse_segment(p).payload]


def test_our_stacks_data_after_a_reset_it_never_got_resets_both_ends():
    """B's engine took the peer's reset (the session closed, its keys erased) but B's stack never
    got it (dropped after the daemon): what B's stack sends next cannot be sealed, so both ends
    are reset; nothing leaves in plaintext, and it is no internal fault."""
    pair = _live(b"closed-local")
    process = pair.engine_b.process

    def lose_resets_to_stack(packet, direction, now):  # type: ignore[no-untyped-def]
        verdict = process(packet, direction, now)
        if direction is Direction.INBOUND and parse_segment(packet).flags & TCP_RST:
            return DROP  # the engine took the reset, B's stack never sees it
        return verdict

    pair.intercept[pair.engine_b] = lose_resets_to_stack
    pair.a._emit(TCP_RST | TCP_ACK)
    pair.run(max_time=1.0)
    (session,) = pair.engine_b._sessions.values()
    assert session.state.value == "closed" and session.send.cipher is None
    del pair.intercept[pair.engine_b]
    wire_before = len(pair.wire)
    pair.b.write(b"after the reset" * 10)
    pair.run(max_time=1.0)
    assert session.state.value == "aborted" and pair.engine_b.counters["internal_errors"] == 0
    assert pair.b.was_reset
    assert not [p for p in pair.wire[wire_before:] if parse_segment(p).src == B_IP and parse_segment(p).payload]


def test_init2_after_a_reset_during_the_key_exchange_resets_both_ends():
    """A's stack resets the connection while Init2 is on its way (A's session closes, its private
    key erased): Init2 then cannot be used; the connection is reset toward both ends, and it is
    no internal fault."""
    pair = Pair(seed=b"closed-kex", a_config=seeded_config(b"closed-kex-a", resume=False),
                b_config=seeded_config(b"closed-kex-b", resume=False))
    process = pair.engine_a.process
    held: list[bytes] = []

    def hold_init2(packet, direction, now):  # type: ignore[no-untyped-def]
        if direction is Direction.INBOUND and parse_segment(packet).payload:
            held.append(packet)  # Init2, and its repeats
            return DROP
        return process(packet, direction, now)

    pair.intercept[pair.engine_a] = hold_init2
    pair.b.listen()
    pair.a.connect(B_IP, 80)
    pair.run(max_time=0.5)
    (session,) = pair.engine_a._sessions.values()
    assert held and session.state.value == "key-exchange"
    del pair.intercept[pair.engine_a]
    pair.a._emit(TCP_RST | TCP_ACK)
    pair.run(max_time=0.5)
    assert session.state.value == "closed"
    verdict = pair.engine_a.process(held[0], Direction.INBOUND, pair.now)
    assert verdict.action is Action.DROP
    assert session.state.value == "aborted" and pair.engine_a.counters["internal_errors"] == 0
