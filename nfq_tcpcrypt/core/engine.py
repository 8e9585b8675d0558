"""Engine: the session table and the dispatch of packets to sessions (DESIGN.md §2).

TEMPORARY interface-only version: every packet passes through unchanged. The real engine replaces
this file; the public surface below stays.
"""

from __future__ import annotations

from collections import deque

from .config import Configuration
from .events import Event
from .flow import Direction
from .verdict import ACCEPT, Verdict


class Engine:
    """The sans-I/O core the shell talks to (STYLE.md §2)."""

    def __init__(self, config: Configuration | None = None) -> None:
        self.config = config or Configuration()
        self.counters: dict[str, int] = {}
        self._events: deque[Event] = deque()
        self._inject: list[bytes] = []

    def process(self, packet: bytes, direction: Direction, now: float) -> Verdict:
        """Handle one queued IP packet travelling in `direction`; return its verdict."""
        return ACCEPT

    def segments_to_inject(self) -> list[bytes]:
        """IP packets the shell must send through the marked raw socket, in order."""
        out, self._inject = self._inject, []
        return out

    def get_timer(self) -> float | None:
        """The next deadline (same clock as `now`), or None."""
        return None

    def handle_timer(self, now: float) -> None:
        """Run everything due at `now`."""

    def next_event(self) -> Event | None:
        """The oldest unread event, or None."""
        return self._events.popleft() if self._events else None

    def session_table(self) -> list[dict[str, object]]:
        """One JSON-ready dict per session (see README: `sessions --json`)."""
        return []
