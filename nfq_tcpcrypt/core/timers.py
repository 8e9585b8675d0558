"""A session's timers: one deadline per kind, shared by the session and its stream translator."""

from __future__ import annotations

from enum import StrEnum


class Timer(StrEnum):
    """The kinds of timer a session runs (a StrEnum: hashed as fast as the string)."""

    KEX = "kex"  # our Init message unacknowledged (RFC 8548 §3.3)
    TAIL = "tail"  # wire-only frames unacknowledged (empty rekey frames, RFC 8548 §3.8)
    KEEPALIVE = "keepalive"  # liveness probe by rekeying (RFC 8548 §3.9)
    REPLAY = "replay"  # our stack has not acknowledged plaintext we acknowledged for it


class Timers:
    """Deadlines by kind; a kind armed again moves its deadline."""

    __slots__ = ("_at",)

    def __init__(self) -> None:
        self._at: dict[Timer, float] = {}

    def arm(self, timer: Timer, when: float) -> None:
        self._at[timer] = when

    def cancel(self, timer: Timer) -> None:
        self._at.pop(timer, None)

    def clear(self) -> None:
        self._at.clear()

    def __contains__(self, timer: Timer) -> bool:
        return timer in self._at

    @property
    def next_at(self) -> float | None:
        """The earliest deadline, or None."""
        return min(self._at.values()) if self._at else None

    def take_due(self, now: float) -> list[Timer]:
        """The timers due at `now`, earliest first, disarmed."""
        due = sorted((when, timer.value, timer) for timer, when in self._at.items() if when <= now)
        for _, _, timer in due:
            del self._at[timer]
        return [timer for _, _, timer in due]
