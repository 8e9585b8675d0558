"""What the handshake path makes, made cheaply, behaves as before: the events and Init messages
(dataclasses with constructors written out), the engine's counters, the fast FlowKey and
verdict constructors, and the resumption cache's identifier index kept up to date piecewise."""

from __future__ import annotations

import dataclasses
import os
import random

import pytest

from nfq_tcpcrypt.core import events, kex, resumption
from nfq_tcpcrypt.core.constants import Aead, Role, Tep
from nfq_tcpcrypt.core.engine import Counts, Engine
from nfq_tcpcrypt.core.flow import FlowKey, as_flow
from nfq_tcpcrypt.core.verdict import ACCEPT, Action, Verdict, accept
from nfq_tcpcrypt.core.wire.tcpcrypt import Init1, Init2

FLOW = FlowKey(bytes([10, 0, 0, 1]), 40000, bytes([10, 0, 0, 2]), 80)


@pytest.mark.parametrize(
    ("event", "names"),
    [
        (events.EnoNegotiated(FLOW, "x25519", "A"), ["flow", "tep", "role"]),
        (events.FellBackToPlain(FLOW, "no eno option"), ["flow", "reason"]),
        (events.SessionEstablished(FLOW, "21ab", "aes128gcm", True), ["flow", "session_id", "aead", "resumed"]),
        (events.SessionAborted(FLOW, "bad tag"), ["flow", "reason"]),
        (events.SessionClosed(FLOW, "fin both ways"), ["flow", "reason"]),
        (events.SessionExpired(FLOW), ["flow"]),
    ],
)
def test_events_are_frozen_dataclasses_as_before(event, names):
    """The shell logs an event by `dataclasses.fields`; tests compare events by value."""
    assert [field.name for field in dataclasses.fields(event)] == names
    values = [getattr(event, name) for name in names]
    again = type(event)(*values)
    assert again == event and hash(again) == hash(event)
    assert type(event)(**dict(zip(names, values, strict=True))) == event
    assert repr(event).startswith(type(event).__name__ + "(flow=")
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.flow = FLOW  # type: ignore[misc]
    if len(names) > 1:
        assert dataclasses.replace(event, **{names[1]: values[1]}) == event


def test_init_messages_keep_their_defaults_and_values():
    init1 = Init1((1, 2), b"a" * 32, b"k" * 32)
    assert init1.ignored == b"" and init1 == Init1((1, 2), b"a" * 32, b"k" * 32, b"")
    assert Init2(1, b"b" * 32, b"k" * 32, b"x") != Init2(1, b"b" * 32, b"k" * 32)
    with pytest.raises(dataclasses.FrozenInstanceError):
        init1.n_a = b""  # type: ignore[misc]


def test_counts_read_zero_for_names_never_counted():
    counts = Counts()
    assert counts["never"] == 0 and "never" not in counts
    counts["packets"] += 1
    counts["packets"] += 1
    assert dict(counts) == {"packets": 2}
    engine = Engine()
    assert engine.counters["untracked"] == 0


def test_fast_constructors_equal_the_namedtuples():
    key = (bytes([10, 0, 0, 1]), 40000, bytes([10, 0, 0, 2]), 80)
    flow = as_flow(key)
    assert type(flow) is FlowKey and flow == FLOW and hash(flow) == hash(key) and flow.remote_port == 80
    verdict = accept(b"packet", True)
    assert type(verdict) is Verdict and verdict == Verdict(Action.ACCEPT, b"packet", True)
    assert accept(None) == ACCEPT and accept(b"p").encrypted is False


def _index_from_scratch(cache: resumption.ResumptionCache) -> dict[tuple[bytes, bytes], int]:
    return {(entry.peer, half): key for key, entry in cache._entries.items() for half in entry.halves}


def test_identifier_index_is_what_a_full_rebuild_gives():
    """Takes (offers, answers looking ahead), fills ahead or not, stores past the per-peer bound:
    after each step the index of identifier halves holds exactly every entry's window."""
    rng = random.Random(7)
    cache = resumption.ResumptionCache(max_entries=6, per_peer=3)
    peers = [bytes([10, 0, 0, i]) for i in range(3)]
    issued: dict[bytes, list[resumption.Resumable]] = {}
    for step in range(400):
        peer = rng.choice(peers)
        action = rng.random()
        if action < 0.15:
            cache.store(peer, os.urandom(32), Tep.X25519, Aead.AES_128_GCM, rng.choice([Role.A, Role.B]), 0.0)
        elif action < 0.45:
            offer = cache.take_for_offer(peer, (Tep.X25519,), 1.0)
            if offer is not None:
                issued.setdefault(peer, []).append(offer)
        elif action < 0.8:
            entries = [e for e in cache._entries.values() if e.peer == peer]
            if entries:
                entry = rng.choice(entries)
                ahead = rng.randrange(resumption.LOOKAHEAD)
                wanted = entry.resumable(ahead) if ahead < len(entry.window) else None
                if wanted is not None:
                    found = cache.take_for_answer(peer, int(Tep.X25519), wanted.peer_half, 1.0)
                    assert found is not None and found.ss == wanted.ss, step
        else:
            cache.fill_one()
        assert cache._by_half == _index_from_scratch(cache), step
        for entry in cache._entries.values():
            assert len(entry.window) == len(entry.ids) == len(entry.halves)
            a, b = (9, 18) if entry.original_role is Role.A else (0, 9)
            assert entry.halves == [rid[a:b] for rid in entry.ids]
            assert entry.ids == [kex.resume_identifier(bytes(ss)) for ss in entry.window]
    assert sum(len(offers) for offers in issued.values()) > 20
