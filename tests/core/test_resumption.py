"""Session resumption with fresh per-direction nonces (RFC 8548 §3.5)."""

from __future__ import annotations

import copy

import pytest

from nfq_tcpcrypt.core.config import PolicyRule
from nfq_tcpcrypt.core.constants import INIT1_MAGIC, INIT2_MAGIC, Aead, Role, Tep
from nfq_tcpcrypt.core.engine import Engine
from nfq_tcpcrypt.core.events import FellBackToPlain
from nfq_tcpcrypt.core.wire.eno import parse_eno
from nfq_tcpcrypt.core.wire.tcp import parse_options, parse_segment
from nfq_tcpcrypt.lab.tcpmodel import A_IP, B_IP, Pair, seeded_config

MAGICS = (INIT1_MAGIC.to_bytes(4, "big"), INIT2_MAGIC.to_bytes(4, "big"))


def _pair(a: dict | None = None, b: dict | None = None, logs=None) -> Pair:
    logs = logs if logs is not None else {"a": [], "b": []}
    pair = Pair(
        a_config=seeded_config(b"ra", secrets_log=logs["a"].append, **(a or {})),
        b_config=seeded_config(b"rb", secrets_log=logs["b"].append, **(b or {})),
    )
    pair.logs = logs
    pair.open()
    _exchange(pair)
    return pair


def _exchange(pair: Pair) -> None:
    pair.talk(b"ping" * 500, b"pong" * 700)
    assert bytes(pair.b.received) == b"ping" * 500 and bytes(pair.a.received) == b"pong" * 700


def _session(engine: Engine, port: int) -> dict:
    suffix = f":{port}"
    return next(s for s in engine.session_table() if s["local"].endswith(suffix) or s["remote"].endswith(suffix))


def _syn_enos(pair: Pair) -> list:
    out = []
    for packet in pair.wire:
        seg = parse_segment(packet)
        if seg.is_syn:
            out.append(parse_eno(next(raw for kind, raw in parse_options(seg.options) if kind == 69)))
    return out


def _no_init_messages(pair: Pair) -> bool:
    return not any(parse_segment(p).payload[:4] in MAGICS for p in pair.wire)


def test_second_connection_resumes_with_nonces():
    pair = _pair()
    first = _session(pair.engine_a, 40000)
    assert first["resumed"] is False
    pair.new_connection(40001, 81)
    _exchange(pair)
    a, b = _session(pair.engine_a, 40001), _session(pair.engine_b, 40001)
    assert a["resumed"] is b["resumed"] is True
    assert a["session_id"] == b["session_id"] != first["session_id"]
    assert a["session_id"][:2] == "a3"  # RFC 8547 §5.1: B's TEP byte, v = 1
    syn, synack = _syn_enos(pair)[:2]
    assert [s.v for s in syn.teps] == [True] and len(syn.teps[0].data) == 17  # half + 8-byte nonce
    assert synack.b and synack.teps[0].v and len(synack.teps[0].data) == 17
    assert syn.teps[0].data[:9] != synack.teps[0].data[:9]  # the two identifier halves
    assert _no_init_messages(pair)
    assert [line.split()[0] for line in pair.logs["a"]] == ["ES", "SS"]
    assert pair.logs["a"][1] == pair.logs["b"][1] and len(bytes.fromhex(pair.logs["a"][1].split()[1])) == 18


def test_nonce_length_zero_still_resumes():
    pair = _pair(dict(resume_nonce_len=0), dict(resume_nonce_len=0))
    pair.new_connection(40001, 81)
    _exchange(pair)
    assert _session(pair.engine_a, 40001)["resumed"] and _no_init_messages(pair)
    syn, synack = _syn_enos(pair)[:2]
    assert len(syn.teps[0].data) == len(synack.teps[0].data) == 9


def test_reversed_roles():
    pair = _pair()
    pair.new_connection(40001, 81, b_opens=True)  # the original B opens actively now
    _exchange(pair)
    a, b = _session(pair.engine_a, 40001), _session(pair.engine_b, 40001)
    assert a["resumed"] and b["resumed"] and a["session_id"] == b["session_id"]
    assert (a["role"], b["role"]) == ("B", "A")  # ENO roles of this connection
    pair.new_connection(40002, 82)  # and back again: the chain goes on
    _exchange(pair)
    assert _session(pair.engine_a, 40002)["resumed"]


def test_cloned_cache_gives_new_keys_and_is_accepted_once():
    pair = _pair()
    clone = Engine(seeded_config(b"clone"))  # the same cache contents, another random stream
    clone.cache = copy.deepcopy(pair.engine_a.cache)
    original_a = pair.engine_a
    pair.new_connection(40001, 81)
    _exchange(pair)
    resumed_1 = _session(original_a, 40001)
    pair.engine_a = clone
    pair.new_connection(40002, 82)
    _exchange(pair)
    clone_session, b_session = _session(clone, 40002), _session(pair.engine_b, 40002)
    assert resumed_1["resumed"] is True
    # The clone offered the very same ss[i] with another nonce; B had used it up: fresh exchange.
    syn = _syn_enos(pair)[0]
    assert syn.teps[0].v and len(syn.teps[0].data) == 17
    assert clone_session["resumed"] is False and b_session["resumed"] is False
    assert clone_session["session_id"] == b_session["session_id"] != resumed_1["session_id"]


def test_same_secret_two_nonces_two_key_sets():
    # Two engines restored from one cache resume against two peers that also share one cache:
    # the nonces differ, so the keys and session IDs differ.
    pair = _pair()
    a_cache, b_cache = copy.deepcopy(pair.engine_a.cache), copy.deepcopy(pair.engine_b.cache)
    ids = []
    for seed in (b"x", b"y"):
        pair.engine_a = Engine(seeded_config(b"a" + seed))
        pair.engine_b = Engine(seeded_config(b"b" + seed))
        pair.engine_a.cache, pair.engine_b.cache = copy.deepcopy(a_cache), copy.deepcopy(b_cache)
        pair.new_connection(40001, 81)
        _exchange(pair)
        session = _session(pair.engine_a, 40001)
        assert session["resumed"]
        ids.append((session["session_id"], _syn_enos(pair)[0].teps[0].data[9:]))
    assert ids[0][0] != ids[1][0] and ids[0][1] != ids[1][1]


class TestFailurePaths:
    def test_unknown_identifier_gives_fresh_exchange_and_burns_the_index(self):
        pair = _pair()
        pair.engine_b.flush_cache("test")
        pair.new_connection(40001, 81)
        _exchange(pair)
        assert not _session(pair.engine_a, 40001)["resumed"]
        assert not _no_init_messages(pair)
        # the fresh exchange started a new chain; the burned one moved on to index 2
        indexes = sorted(entry["next_index"] for entry in pair.engine_a.cache_info(pair.now))
        assert indexes == [1, 2]
        pair.new_connection(40002, 82)
        _exchange(pair)
        assert _session(pair.engine_a, 40002)["resumed"]

    def test_other_tep_is_not_resumed(self):
        pair = _pair(dict(teps=(Tep.X25519, Tep.X448)), dict(teps=(Tep.X25519, Tep.X448)))
        pair.engine_b.config.teps = (Tep.X448,)  # B now refuses the cached session's TEP
        pair.new_connection(40001, 81)
        _exchange(pair)
        a = _session(pair.engine_a, 40001)
        assert not a["resumed"] and a["tep"] == "x448"

    def test_short_resume_data_is_a_fresh_offer(self):
        from nfq_tcpcrypt.core import eno
        from nfq_tcpcrypt.core.config import Configuration
        from nfq_tcpcrypt.core.wire.eno import EnoOption, TepSuboption

        offer = EnoOption(None, (TepSuboption(0x23, bytes(8), True),))  # v=1 with 8 < 9 bytes
        calls = []
        raw, found = eno.answer(Configuration(), offer, lambda tep, half: calls.append(half))
        assert found is None and calls == [] and parse_eno(raw).teps[0] == TepSuboption(0x23)

    def test_wrong_half_in_the_answer_is_ignored(self):
        # RFC 8548 §3.5: A ignores a resumption answer whose half does not match; with no other
        # valid TEP, ENO is disabled and the connection is plain TCP on both sides.
        from nfq_tcpcrypt.core.wire.tcp import serialize_segment
        from nfq_tcpcrypt.lab.tcpmodel import Channel

        class BadHalf(Channel):
            def carry(self, packet):
                seg = parse_segment(packet)
                if seg.is_syn and seg.is_ack:
                    seg.options = _flip_half(seg.options)
                    return [(0, serialize_segment(seg))]
                return [(0, packet)]

        def _flip_half(options: bytes) -> bytes:
            i = options.index(b"\x45\x15\x01\xa3") + 4
            return options[:i] + bytes([options[i] ^ 0xFF]) + options[i + 1 :]

        pair = _pair()
        pair.channel = BadHalf(0)
        pair.new_connection(40001, 81)
        _exchange(pair)
        assert _session(pair.engine_a, 40001)["tep"] is None
        assert any(isinstance(e, FellBackToPlain) for e in pair.events(pair.engine_b))

    def test_crossing_syns_both_fresh(self):
        # Each side burns the secret it offers, so crossing offers of one ss[i] are both refused.
        pair = _pair()
        a_offer = pair.engine_a.cache.take_for_offer(B_IP, (Tep.X25519,), pair.now)
        b_offer = pair.engine_b.cache.take_for_offer(A_IP, (Tep.X25519,), pair.now)
        assert a_offer.ss == b_offer.ss
        assert pair.engine_b.cache.take_for_answer(A_IP, 0x23, a_offer.our_half, pair.now) is None
        assert pair.engine_a.cache.take_for_answer(B_IP, 0x23, b_offer.our_half, pair.now) is None


class TestControls:
    def test_no_resume_policy(self):
        pair = _pair(b=dict(policies=(PolicyRule(port=81, no_resume=True),)))
        pair.new_connection(40001, 81)
        _exchange(pair)
        assert not _session(pair.engine_a, 40001)["resumed"]

    def test_no_cache_policy(self):
        pair = _pair(a=dict(policies=(PolicyRule(network="10.77.0.0/24", no_cache=True),)))
        assert pair.engine_a.cache_info(pair.now) == []
        pair.new_connection(40001, 81)
        _exchange(pair)
        assert not _session(pair.engine_a, 40001)["resumed"]

    def test_flush_then_fresh(self):
        pair = _pair()
        info = pair.engine_a.cache_info(pair.now)
        assert len(info) == 1 and "ss" not in info[0] and info[0]["peer"] == "10.77.0.2"
        assert pair.engine_a.flush_cache("test") == 1
        pair.new_connection(40001, 81)
        _exchange(pair)
        assert not _session(pair.engine_a, 40001)["resumed"]

    def test_expiry(self):
        pair = _pair(dict(resume_ttl=5.0))
        pair.now += 10
        pair.new_connection(40001, 81)
        _exchange(pair)
        assert not _session(pair.engine_a, 40001)["resumed"]

    @pytest.mark.parametrize("size", [1, 2])
    def test_lru_bound(self, size):
        from nfq_tcpcrypt.core.resumption import ResumptionCache

        cache = ResumptionCache(max_entries=size)
        for i in range(3):
            cache.store(bytes([10, 0, 0, i]), bytes(32), Tep.X25519, Aead.AES_128_GCM, Role.A, 0.0)
        assert [e["peer"] for e in cache.info(0.0)] == [f"10.0.0.{i}" for i in range(3 - size, 3)]


@pytest.mark.parametrize("ahead", [False, True])
def test_cache_answers_the_same_whether_its_windows_were_filled_ahead_or_not(ahead):
    """The next secrets and identifiers of an entry are derived while the daemon is idle
    (ResumptionCache.fill_one) or, if that has not run yet, by the lookup that needs them: the
    secrets handed out are the chain ss[i+1] = CPRF(ss[i], CONST_NEXTK) either way (RFC 8548
    §3.5), each once, and a peer's identifier up to LOOKAHEAD-1 secrets ahead is recognised."""
    import os

    from nfq_tcpcrypt.core import kex, resumption
    from nfq_tcpcrypt.core.constants import Aead

    peer = bytes([10, 0, 0, 1])
    ss0 = os.urandom(32)
    chain = [kex.next_session_secret(ss0)]
    for _ in range(12):
        chain.append(kex.next_session_secret(chain[-1]))
    offering = resumption.ResumptionCache()  # our role A: we offer
    answering = resumption.ResumptionCache()  # our role B: we answer
    offering.store(peer, ss0, Tep.X25519, Aead.AES_128_GCM, Role.A, 0.0)
    answering.store(peer, ss0, Tep.X25519, Aead.AES_128_GCM, Role.B, 0.0)
    if ahead:
        assert offering.wanted and answering.wanted
        while offering.fill_one() or answering.fill_one():
            pass
        assert not offering.wanted and not answering.wanted
    index = 0
    for skip in (0, 2, 0, resumption.LOOKAHEAD - 1, 1):
        for _ in range(skip):  # offers the peer never saw (lost SYNs): the answerer looks ahead
            assert offering.take_for_offer(peer, (Tep.X25519,), 1.0).ss == chain[index]
            index += 1
        offer = offering.take_for_offer(peer, (Tep.X25519,), 1.0)
        assert offer is not None and offer.ss == chain[index] and offer.resume_id == kex.resume_identifier(chain[index])
        found = answering.take_for_answer(peer, int(Tep.X25519), offer.our_half, 1.0)
        assert found is not None and found.ss == offer.ss and found.peer_half == offer.our_half
        assert answering.take_for_answer(peer, int(Tep.X25519), offer.our_half, 1.0) is None  # used once
        index += 1
        if ahead:
            while offering.fill_one() or answering.fill_one():
                pass


def test_resumed_keys_made_ahead_while_idle_are_the_ones_used():
    """Host B of a resumed session makes its keys while it waits for the third ACK
    (Engine.prepare after its SYN-ACK); the third ACK takes them, and both ends agree on the
    session ID and the data; without that idle time B makes the same keys at the third ACK."""
    for ahead in (True, False):
        pair = _pair()
        engine = pair.engine_b
        made = []
        if ahead:
            real = engine.process

            def process(packet, direction, now, _real=real, _engine=engine, _made=made):  # type: ignore[no-untyped-def]
                verdict = _real(packet, direction, now)
                sessions = list(_engine._ahead)
                while _engine.prepare_wanted(now):
                    _engine.prepare(now)
                _made.extend(s for s in sessions if s._made_ahead is not None)
                return verdict

            pair.intercept[engine] = process
        pair.new_connection(40001, 80)
        _exchange(pair)
        assert _no_init_messages(pair)
        a, b = _session(pair.engine_a, 40001), _session(engine, 40001)
        assert a["resumed"] and b["resumed"] and a["session_id"] == b["session_id"]
        assert len(made) == (1 if ahead else 0)
        assert all(s._made_ahead is None for s in engine._sessions.values())  # taken, none left over
