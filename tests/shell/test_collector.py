"""The cycle collector at the loop's idle point (shell/collector.py): a reference cycle made while
handling a packet is collected once no packet waits, by the automatic collector when the loop is
never idle, and a cycle that reached the old generation by the next full collection."""

from __future__ import annotations

import gc
import os
import signal
import weakref
from typing import Any

import pytest

from nfq_tcpcrypt.core.flow import Direction
from nfq_tcpcrypt.core.verdict import Action, Verdict
from nfq_tcpcrypt.shell import collector as collector_module
from nfq_tcpcrypt.shell.collector import Collector
from tests.shell.test_queue_loop import FakeEngine, _run_three_packets


class Node:
    """One object of a reference cycle."""

    def __init__(self) -> None:
        self.other: Any = self
        self.padding = [{} for _ in range(collector_module.YOUNG)]  # enough tracked objects to be due


def _cycle() -> weakref.ref[Node]:
    """A reference cycle nobody else holds; its weak reference dies when it is collected."""
    node = Node()
    node.other = Node()
    node.other.other = node
    return weakref.ref(node)


class CyclingEngine(FakeEngine):
    """Every packet leaves a reference cycle behind, as a bug on the packet path would."""

    def __init__(self, log: list[tuple[str, Any]]) -> None:
        super().__init__(log, stop_after=0, now_deadline=0.0, inject=())
        self._timer = None
        self.cycles: list[weakref.ref[Node]] = []

    def process(self, packet: bytes, direction: Direction, now: float, encrypted: bool = False,
                info: Any = None) -> Verdict:
        self.cycles.append(_cycle())
        self.log.append(("process", gc.get_count()))
        return Verdict(Action.ACCEPT)


class StoppingCollector(Collector):
    """Stops the loop (SIGTERM) once the packets' cycles are gone."""

    def __init__(self, engine: CyclingEngine, log: list[tuple[str, Any]]) -> None:
        super().__init__()
        self.engine, self.log = engine, log

    def collect(self, now: float) -> bool:
        collected = super().collect(now)
        self.log.append(("collect", collected))
        if len(self.engine.cycles) == 3 and all(ref() is None for ref in self.engine.cycles):
            os.kill(os.getpid(), signal.SIGTERM)
        return collected


@pytest.mark.timeout(30)
def test_a_cycle_made_on_the_packet_path_is_collected_once_no_packet_waits() -> None:
    log: list[tuple[str, Any]] = []
    engine = CyclingEngine(log)
    loop, _ = _run_three_packets(engine, log, StoppingCollector(engine, log))  # SIGTERM once collected
    counters = loop.all_counters()
    assert len(engine.cycles) == 3 and all(ref() is None for ref in engine.cycles)
    kinds = [kind for kind, _ in log]
    # Every packet first, the collection at the idle point after them, none by the automatic collector.
    assert kinds[:6] == ["process", "verdict"] * 3, kinds
    assert "collect" in kinds and kinds.index("collect") > 5
    assert counters["shell.gc_young"] + counters["shell.gc_middle"] + counters["shell.gc_full"] >= 1
    assert counters["shell.gc_backstop"] == 0
    assert gc.get_threshold()[0] != collector_module.BACKSTOP  # stop() gave the thresholds back


def test_a_cycle_is_collected_when_the_loop_is_never_idle() -> None:
    collector = Collector()
    collector.start(0.0)
    try:
        ref = _cycle()
        # A flood: tracked objects are made and kept, the idle point never comes.
        kept = [[] for _ in range(collector_module.BACKSTOP * 2)]
        assert ref() is None
        assert collector.counters["gc_backstop"] >= 1
        assert collector.counters["gc_young"] == 0
        del kept
    finally:
        collector.stop()


def test_a_cycle_in_the_old_generation_is_collected_by_the_timed_full_collection() -> None:
    collector = Collector()
    collector.start(0.0)
    try:
        holder = [_cycle()()]
        for _ in range(collector_module.OLD):
            gc.collect(1)  # the cycle, still reachable, now sits in the old generation
        ref = weakref.ref(holder.pop())
        assert ref() is not None  # now garbage, but only a full collection finds it
        while collector.collect(1.0):  # the young and middle generations, before the full one's time
            pass
        assert ref() is not None
        assert collector.due(collector_module.FULL_EVERY)
        assert collector.collect(collector_module.FULL_EVERY)
        assert ref() is None
        assert collector.counters["gc_full"] == 1
        for _ in range(collector_module.OLD):
            gc.collect(1)
        # The next waits FULL_EVERY at least, longer after a long collection (FULL_SHARE).
        assert collector._full_next >= collector_module.FULL_EVERY * 2
        assert not collector.due(collector._full_next - 0.001)
        assert collector.due(collector._full_next)
    finally:
        collector.stop()


def test_no_full_collection_before_enough_was_promoted() -> None:
    collector = Collector()
    collector.start(0.0)
    try:
        gc.collect(1)
        while collector.collect(collector_module.FULL_EVERY * 5):  # young and middle ones only
            pass
        assert collector.counters["gc_full"] == 0
    finally:
        collector.stop()
