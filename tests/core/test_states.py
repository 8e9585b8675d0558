"""The session's state machine: every transition of the table, and the paths real connections take."""

from __future__ import annotations

import logging

import pytest

from nfq_tcpcrypt.core.config import Configuration
from nfq_tcpcrypt.core.errors import LocalProtocolError
from nfq_tcpcrypt.core.flow import FlowKey
from nfq_tcpcrypt.core.session import TRANSITIONS, Session, State, Trigger
from nfq_tcpcrypt.lab.tcpmodel import A_IP, B_IP, Pair

ENDING = {Trigger.FINISHED, Trigger.RESET, Trigger.REFUSE, Trigger.ABORT}


def _session(state: State) -> Session:
    session = Session(FlowKey(A_IP, 40000, B_IP, 80), Configuration(), lambda event: None, lambda injection: None)
    session.state = state  # test set-up only: the table is what is under test
    return session


@pytest.mark.parametrize(("start", "trigger"), list(TRANSITIONS), ids=lambda x: x.value)
def test_every_transition_of_the_table(start: State, trigger: Trigger):
    session = _session(start)
    session._set_state(trigger, 5.0)
    assert session.state is TRANSITIONS[(start, trigger)]
    assert (session.closed_at == 5.0) == (trigger in ENDING)


def test_every_other_pair_is_refused():
    for state in State:
        for trigger in Trigger:
            if (state, trigger) in TRANSITIONS:
                continue
            session = _session(state)
            with pytest.raises(LocalProtocolError):
                session._set_state(trigger, 1.0)
            assert session.state is state and session.closed_at is None


def test_every_state_is_reachable_from_new_and_ends_are_terminal():
    reached, frontier = {State.NEW}, [State.NEW]
    while frontier:
        state = frontier.pop()
        for (old, _), new in TRANSITIONS.items():
            if old is state and new not in reached:
                reached.add(new)
                frontier.append(new)
    assert reached == set(State)
    assert not [key for key in TRANSITIONS if key[0] in (State.ABORTED, State.REFUSED)]


def test_connection_walks_new_to_closed_on_both_ends(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.DEBUG, logger="nfq_tcpcrypt.core.session")
    pair = Pair(seed=b"states").open()
    pair.talk(b"a" * 5000, b"b" * 7000)
    pair.close()
    walks = {}
    for engine, name in ((pair.engine_a, "a"), (pair.engine_b, "b")):
        (info,) = engine.session_table()
        assert info["state"] == "closed"
        walks[name] = [(r.args[1], r.args[2], r.args[3]) for r in caplog.records
                       if r.name == "nfq_tcpcrypt.core.session" and isinstance(r.args, tuple) and len(r.args) == 4
                       and r.msg.startswith("%s: %s -> %s") and _engine_of(r, pair) == name]
    assert walks["a"] == [("new", "eno-sent", "syn-sent"), ("eno-sent", "key-exchange", "eno-ok"),
                          ("key-exchange", "encrypting", "keys"), ("encrypting", "closing", "fin"),
                          ("closing", "closed", "finished")]
    assert walks["b"][:3] == [("new", "eno-received", "syn-received"), ("eno-received", "key-exchange", "eno-ok"),
                              ("key-exchange", "encrypting", "keys")]
    assert walks["b"][3:] == [("encrypting", "closing", "fin"), ("closing", "closed", "finished")]


def _engine_of(record: logging.LogRecord, pair: Pair) -> str:
    """Which end logged: A's flows have A's address as the local one."""
    flow = record.args[0]  # type: ignore[index]
    return "a" if flow.local_ip == A_IP else "b"


def test_plain_peer_falls_back_and_a_fin_ends_it(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.DEBUG, logger="nfq_tcpcrypt.core.session")
    pair = Pair(seed=b"states-plain", b_engine=False).open()
    pair.talk(b"x" * 100, b"y" * 100)
    pair.close()
    (info,) = pair.engine_a.session_table()
    assert info["state"] == "plain" and info["session_id"] is None
    moves = [r.args[1:] for r in caplog.records if r.msg.startswith("%s: %s -> %s")]  # type: ignore[index]
    assert moves == [("new", "eno-sent", "syn-sent"), ("eno-sent", "plain", "fallback"), ("plain", "plain", "finished"),
                     ("plain", "plain", "finished")]
