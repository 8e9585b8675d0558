"""Negotiation rules of RFC 8547 §4 and RFC 8548 §3.2–§3.3: every TEP and AEAD, preference orders,
disjoint lists, and the fallback rules."""

from __future__ import annotations

import itertools

import pytest

from nfq_tcpcrypt.core.constants import AEAD_NAMES, TEP_NAMES, Aead, Tep
from nfq_tcpcrypt.core.events import FellBackToPlain, SessionAborted
from nfq_tcpcrypt.core.flow import Direction
from nfq_tcpcrypt.core.wire.eno import parse_eno
from nfq_tcpcrypt.core.wire.tcp import parse_options, parse_segment
from nfq_tcpcrypt.lab.tcpmodel import A_IP, B_IP, Pair, seeded_config


def _pair(a: dict, b: dict) -> Pair:
    pair = Pair(a_config=seeded_config(b"na", **a), b_config=seeded_config(b"nb", **b))
    pair.open()
    pair.talk(b"request" * 300, b"response" * 3000)
    return pair


def _eno(pair: Pair, index: int) -> bytes:
    options = parse_options(parse_segment(pair.wire[index]).options)
    return next(raw for kind, raw in options if kind == 69)


@pytest.mark.parametrize("tep, aead", list(itertools.product(Tep, Aead)))
def test_every_tep_and_aead(tep, aead):
    pair = _pair(dict(teps=(tep,), aeads=(aead,)), dict(teps=(tep,), aeads=(aead,)))
    assert bytes(pair.b.received) == b"request" * 300
    assert bytes(pair.a.received) == b"response" * 3000
    ta, tb = pair.engine_a.session_table()[0], pair.engine_b.session_table()[0]
    assert (ta["tep"], ta["aead"]) == (tb["tep"], tb["aead"]) == (TEP_NAMES[tep], AEAD_NAMES[aead])
    assert ta["session_id"] == tb["session_id"] and ta["session_id"][:2] == f"{tep:02x}"


def test_b_chooses_by_its_own_preference():
    a = dict(teps=(Tep.X25519, Tep.P256, Tep.X448), aeads=(Aead.AES_128_GCM, Aead.CHACHA20_POLY1305, Aead.AES_256_GCM))
    b = dict(teps=(Tep.X448, Tep.X25519), aeads=(Aead.CHACHA20_POLY1305, Aead.AES_128_GCM))
    pair = _pair(a, b)
    ta = pair.engine_a.session_table()[0]
    assert (ta["tep"], ta["aead"]) == ("x448", "chacha20poly1305")
    syn, synack = parse_eno(_eno(pair, 0)), parse_eno(_eno(pair, 1))
    assert {s.tep for s in syn.teps} == {0x23, 0x21, 0x24}
    assert synack.b and [s.tep for s in synack.teps] == [0x24]  # RFC 8547 §4.5: B sends one TEP
    payloads = [parse_segment(p).payload for p in pair.wire]
    init1 = next(p for p in payloads if p[:4] == bytes.fromhex("15101a0e"))
    assert init1[8] == 3  # A offers all three AEADs


def test_disjoint_teps_stay_plain():
    pair = _pair(dict(teps=(Tep.X25519,)), dict(teps=(Tep.P256,)))
    assert bytes(pair.a.received) == b"response" * 3000
    events = pair.events(pair.engine_b)
    assert any(isinstance(e, FellBackToPlain) and "no common tep" in e.reason for e in events)
    assert b"response" in b"".join(parse_segment(p).payload for p in pair.wire)


def test_disjoint_aeads_abort():
    # RFC 8548 leaves it open (docs/protocol.md T4); ENO already succeeded, so the only
    # safe outcome is an abort: B resets, A's stack sees an error, no byte flows in the clear.
    pair = _pair(dict(aeads=(Aead.AES_128_GCM,)), dict(aeads=(Aead.CHACHA20_POLY1305,)))
    events = pair.events(pair.engine_b)
    assert any(isinstance(e, SessionAborted) and "no aead" in e.reason for e in events)
    assert pair.a.was_reset and pair.b.was_reset
    assert b"request" not in b"".join(parse_segment(p).payload for p in pair.wire)


def _open(a: dict, b: dict, simultaneous: bool = False) -> Pair:
    pair = Pair(a_config=seeded_config(b"sa", **a), b_config=seeded_config(b"sb", **b))
    if simultaneous:
        pair.b.port = 40001
        pair.a.connect(B_IP, 40001)
        pair.b.connect(A_IP, 40000)
    else:
        pair.b.listen()
        pair.a.connect(B_IP, 80)
    pair.run()
    pair.talk(b"from a" * 1000, b"from b" * 1000)
    assert bytes(pair.b.received) == b"from a" * 1000 and bytes(pair.a.received) == b"from b" * 1000
    return pair


def _roles(pair: Pair) -> tuple:
    ta, tb = pair.engine_a.session_table()[0], pair.engine_b.session_table()[0]
    return ta["role"], tb["role"], ta["session_id"] == tb["session_id"] != None  # noqa: E711


class TestSimultaneousOpen:
    def test_one_side_b_encrypts(self):
        pair = _open({}, dict(eno_role_b=True), simultaneous=True)
        assert _roles(pair) == ("A", "B", True)
        syn_b = next(parse_segment(p) for p in pair.wire if parse_segment(p).src == B_IP)
        option = parse_eno(next(raw for kind, raw in parse_options(syn_b.options) if kind == 69))
        assert option.b and option.global_byte == 0x01

    def test_both_b_zero_stays_plain(self):
        pair = _open({}, {}, simultaneous=True)
        assert _roles(pair) == (None, None, False)
        events = pair.events(pair.engine_a)
        assert any(isinstance(e, FellBackToPlain) and "both sides sent b=0" in e.reason for e in events)

    def test_active_opener_with_b_meets_passive_b_stays_plain(self):
        pair = _open(dict(eno_role_b=True), {})
        assert _roles(pair) == (None, None, False)


class TestGlobalBits:
    def test_mandatory_app_aware_needs_peer_a(self):
        pair = _open({}, dict(eno_app_aware_mandatory=True))
        assert _roles(pair) == (None, None, False)
        pair = _open(dict(eno_app_aware=True), dict(eno_app_aware=True, eno_app_aware_mandatory=True))
        assert _roles(pair) == ("A", "B", True)

    def test_reserved_bits_and_unknown_teps_are_ignored(self):
        from nfq_tcpcrypt.core import eno
        from nfq_tcpcrypt.core.config import Configuration

        config = Configuration(teps=(Tep.X25519,))
        offer = parse_eno(bytes((0x45, 0x06, 0x1C, 0x55, 0x7F, 0x23)))
        answer = parse_eno(eno.answer(config, offer)[0])
        assert answer.raw == bytes((0x45, 0x04, 0x01, 0x23))
        assert eno.negotiate(config, answer, offer).tep == Tep.X25519

    def test_repeated_tep_is_not_valid(self):
        from nfq_tcpcrypt.core import eno
        from nfq_tcpcrypt.core.config import Configuration

        config = Configuration(teps=(Tep.X25519, Tep.P256))
        offer = parse_eno(bytes((0x45, 0x05, 0x23, 0x23, 0x21)))  # 0x23 twice: invalid (§4.5 rule 3)
        assert parse_eno(eno.answer(config, offer)[0]).teps[0].tep == 0x21
        with pytest.raises(eno.EnoFailed):
            eno.answer(config, parse_eno(bytes((0x45, 0x04, 0x23, 0x23))))

    def test_last_valid_tep_in_b_option_wins(self):
        from nfq_tcpcrypt.core import eno
        from nfq_tcpcrypt.core.config import Configuration

        config = Configuration(teps=(Tep.X25519, Tep.P256, Tep.X448))
        ours = parse_eno(bytes((0x45, 0x05, 0x24, 0x21, 0x23)))
        theirs = parse_eno(bytes((0x45, 0x06, 0x01, 0x21, 0x24, 0x30)))  # B: P-256, X448, unknown
        assert eno.negotiate(config, ours, theirs).tep == Tep.X448


def test_syn_without_eno_after_retransmissions():
    # A path that drops SYNs with ENO: the third SYN goes without it and the connection works in
    # plain TCP (RFC 8547 §4.6).
    from nfq_tcpcrypt.lab.tcpmodel import Channel

    class DropEnoSyns(Channel):
        def carry(self, packet):
            seg = parse_segment(packet)
            if seg.is_syn and any(kind == 69 for kind, _ in parse_options(seg.options)):
                return []
            return [(0, packet)]

    pair = Pair(channel=DropEnoSyns(0))
    pair.open()
    pair.a.write(b"hello")
    pair.run()
    assert bytes(pair.b.received) == b"hello"
    assert any(isinstance(e, FellBackToPlain) and "without eno" in e.reason for e in pair.events(pair.engine_a))


def test_retransmitted_synack_keeps_its_eno_option():
    # RFC 8547 §4.6: the SYN-form option must not change across retransmissions, also when the
    # passive side's stack resends its SYN-ACK after the session is already keyed.
    pair = Pair(seed=b"synack").open()
    b = pair.b
    b.state = "syn-received"
    b._send_syn()  # noqa: SLF001 - the model's own SYN-ACK retransmission
    synack = b.out.pop()
    verdict = pair.engine_b.process(synack, Direction.OUTBOUND, pair.now)
    options = parse_options(parse_segment(verdict.packet).options)
    assert [raw for kind, raw in options if kind == 69] == [bytes.fromhex("45040123")]


def test_syn_resent_after_eno_succeeded_keeps_its_eno_option():
    # RFC 8547 §4.6: our stack's SYN retransmission can cross the SYN-ACK; once that SYN-ACK has
    # keyed the session, the resent SYN still carries the option unchanged (ENO was not disabled).
    pair = Pair(seed=b"syn").open()
    first_syn = pair.wire[0]
    a = pair.a
    a.state = "syn-sent"
    a._send_syn()  # noqa: SLF001 - the model's own SYN retransmission
    syn = a.out.pop()
    verdict = pair.engine_a.process(syn, Direction.OUTBOUND, pair.now)
    assert verdict.packet is not None and parse_segment(verdict.packet).is_syn
    options = parse_options(parse_segment(verdict.packet).options)
    assert [raw for kind, raw in options if kind == 69] == [_eno(pair, 0)]
    assert parse_segment(first_syn).is_syn
    assert pair.engine_a.session_table()[0]["state"] == "encrypting"


def test_peer_eno_option_is_not_passed_to_our_side():
    pair = Pair(seed=b"strip")
    seen = []
    receive = pair.b.receive
    pair.b.receive = lambda packet: (seen.append(packet), receive(packet))[1]
    pair.open()
    syn = parse_segment(seen[0])
    assert syn.is_syn and not any(kind == 69 for kind, _ in parse_options(syn.options))
    assert pair.engine_b.session_table()[0]["role"] == "B"


def test_our_side_speaking_eno_itself_is_left_alone():
    from nfq_tcpcrypt.core.engine import Engine
    from nfq_tcpcrypt.core.wire.tcp import new_segment, serialize_segment

    engine = Engine(seeded_config(b"nested"))
    options = b"\x02\x04\x05\xb4\x45\x03\x23\x00"  # MSS, and an ENO option of our side's own
    syn = serialize_segment(new_segment(A_IP, B_IP, 40000, 80, 1, 0, 0x02, 1000, options))
    verdict = engine.process(syn, Direction.OUTBOUND, 0.0)
    assert verdict.packet is None  # untouched
    events = []
    while (event := engine.next_event()) is not None:
        events.append(event)
    assert any(isinstance(e, FellBackToPlain) and "tcp-eno itself" in e.reason for e in events)


def test_ecn_setup_syns_negotiate_like_any_other():
    # RFC 3168 §6.1.1: an ECN-setup SYN carries ECE and CWR, the SYN-ACK ECE; ENO is unaffected
    # and the flags reach the other side unchanged.
    from nfq_tcpcrypt.core.constants import TCP_CWR, TCP_ECE
    from nfq_tcpcrypt.core.wire.tcp import serialize_segment

    pair = Pair(seed=b"ecn")
    pair.b.listen()
    pair.a.connect(B_IP, 80)
    syn = parse_segment(pair.a.out[0])
    syn.flags |= TCP_ECE | TCP_CWR
    pair.a.out[0] = serialize_segment(syn)
    pair.run()
    pair.talk(b"ecn" * 1000, b"ok")
    assert bytes(pair.b.received) == b"ecn" * 1000
    wire_syn = parse_segment(pair.wire[0])
    assert wire_syn.flags & (TCP_ECE | TCP_CWR) == TCP_ECE | TCP_CWR
    assert any(kind == 69 for kind, _ in parse_options(wire_syn.options))
    assert pair.engine_a.session_table()[0]["session_id"] == pair.engine_b.session_table()[0]["session_id"]
