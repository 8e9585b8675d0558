"""A session's timers: one deadline per kind, shared by the session and its stream translator."""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class Timer(StrEnum):
    """The kinds of timer a session runs (a StrEnum: hashed as fast as the string)."""

    KEX = "kex"  # our Init message unacknowledged (RFC 8548 §3.3)
    TAIL = "tail"  # wire-only frames unacknowledged (empty rekey frames, RFC 8548 §3.8)
    KEEPALIVE = "keepalive"  # liveness probe by rekeying (RFC 8548 §3.9)
    REPLAY = "replay"  # our stack has not acknowledged plaintext we acknowledged for it


class Timers(dict[Timer, float]):
    """Deadlines by kind; a kind armed again moves its deadline. A dict, so that the engine's
    frequent question (the earliest deadline) is one builtin call.

    `armed` (the engine's, shared by all sessions) learns `owner` whenever a timer is armed, so the
    engine looks only at sessions that may have a deadline, not at the whole table; it drops an
    owner whose timers have all gone."""

    __slots__ = ("_armed", "_owner")

    def __init__(self, armed: dict[Any, None] | None = None, owner: object = None) -> None:
        super().__init__()
        self._armed = armed
        self._owner = owner

    def arm(self, timer: Timer, when: float) -> None:
        self[timer] = when
        if self._armed is not None:
            self._armed[self._owner] = None

    def detach(self) -> None:
        """The engine forgot the owner (Session.forget): no reference back to it, no more
        notices to the engine's `armed`."""
        self._armed = None
        self._owner = None

    def cancel(self, timer: Timer) -> None:
        self.pop(timer, None)

    @property
    def next_at(self) -> float | None:
        """The earliest deadline, or None."""
        return min(self.values()) if self else None

    def take_due(self, now: float) -> list[Timer]:
        """The timers due at `now`, earliest first, disarmed."""
        due = sorted((when, timer.value, timer) for timer, when in self.items() if when <= now)
        for _, _, timer in due:
            del self[timer]
        return [timer for _, _, timer in due]
