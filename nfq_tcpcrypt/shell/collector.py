"""The cycle collector, run while no packet waits (README: Memory bounds).

CPython's collector starts whenever tracked allocations outrun deallocations by its threshold (700),
in the middle of whatever allocated: on the packet path, where a full collection of a daemon with
thousands of sessions stalls every connection in flight for tens of milliseconds. Here the loop
collects at its idle point instead (loop.py: after a `poll(0)` found no packet waiting, where it also
does the engine's work ahead of need), one generation per idle point, as CPython would choose it:

- the young generation once it holds `YOUNG` objects;
- the middle one after `MIDDLE` young collections;
- everything once `OLD` middle collections have promoted objects since the last full one, at most
  every `FULL_EVERY` seconds and seldom enough that full collections take at most `FULL_SHARE` of
  the time: a full collection walks every live object (dozens per session), so its interval grows
  with the heap, as CPython's own rule (a quarter of the old generation new since the last one)
  makes it grow.

Garbage an outsider makes must not outlive its bound either when the loop is never idle (a flood):
the automatic collector stays on with its young threshold raised to `BACKSTOP`, so it still runs,
rarely, when the idle point does not come; and cycles promoted to the old generation by those
collections are collected by CPython's own full collections (after ten middle ones, once the
objects awaiting a full collection exceed a quarter of those that survived the last one).

`gc.freeze()` at start moves what start-up made (it lives as long as the daemon) out of every pass.
"""

from __future__ import annotations

import gc
import time
from typing import Any, Final

YOUNG: Final = 700
"""Objects in the young generation before the idle point collects it (CPython's default threshold)."""
MIDDLE: Final = 10
"""Young collections before the idle point collects the middle generation (CPython's default)."""
OLD: Final = 10
"""Middle collections before a full one is due (CPython's default)."""
FULL_EVERY: Final = 10.0
"""Seconds at least between full collections at the idle point."""
FULL_SHARE: Final = 0.01
"""The share of the time full collections may take: the next waits a hundred times the last one's length."""
BACKSTOP: Final = 20_000
"""The automatic collector's young threshold while the loop collects at its idle point: it runs
only when the idle point does not come (at most about this many young objects, a few MB)."""


class Collector:
    """Collects the daemon's reference cycles at the loop's idle point (module docstring)."""

    def __init__(self) -> None:
        self.counters: dict[str, int] = {"gc_young": 0, "gc_middle": 0, "gc_full": 0, "gc_backstop": 0}
        """Collections at the idle point per generation, and the automatic collector's (backstop)."""
        self._full_next = 0.0
        """When the next full collection may run (the loop's clock)."""
        self._saved: tuple[int, int, int] | None = None
        self._ours = False

    def start(self, now: float) -> None:
        """Freeze what start-up made and raise the automatic threshold to the backstop."""
        gc.freeze()
        self._saved = gc.get_threshold()
        gc.set_threshold(BACKSTOP, self._saved[1], self._saved[2])
        gc.callbacks.append(self._observe)
        self._full_next = now + FULL_EVERY

    def stop(self) -> None:
        """Give the automatic collector its thresholds back, and unfreeze."""
        if self._saved is not None:
            gc.set_threshold(*self._saved)
            gc.callbacks.remove(self._observe)
            gc.unfreeze()
            self._saved = None

    def due(self, now: float) -> bool:
        """Whether the idle point has a collection to do."""
        return self._generation(now) >= 0

    def collect(self, now: float) -> bool:
        """At the idle point: the one collection due (module docstring); False when none was."""
        generation = self._generation(now)
        if generation == 2:
            started = time.monotonic()
            self._run(2, "gc_full")
            self._full_next = now + max(FULL_EVERY, (time.monotonic() - started) / FULL_SHARE)
            return True
        if generation == 1:
            return self._run(1, "gc_middle")
        if generation == 0:
            return self._run(0, "gc_young")
        return False

    def _generation(self, now: float) -> int:
        """The oldest generation due for collection, -1 for none."""
        young, middle, old = gc.get_count()
        if old >= OLD and now >= self._full_next:
            return 2
        if middle >= MIDDLE:
            return 1
        return 0 if young >= YOUNG else -1

    def _run(self, generation: int, name: str) -> bool:
        self._ours = True
        try:
            gc.collect(generation)
        finally:
            self._ours = False
        self.counters[name] += 1
        return True

    def _observe(self, phase: str, info: dict[str, Any]) -> None:
        """gc.callbacks: counts the automatic collector's own runs (the backstop)."""
        if phase == "start" and not self._ours:
            self.counters["gc_backstop"] += 1
