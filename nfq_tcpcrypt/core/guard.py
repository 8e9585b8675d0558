"""Checks of unsynchronized control segments against a live session, in wire space (RFC 5961).

An off-path attacker who knows only the 4-tuple must not be able to reset or replace an encrypted
connection: an RST is taken only at exactly the next expected wire sequence number (RFC 5961 §3.2),
one elsewhere in the window earns a challenge ACK, and a SYN on a synchronized connection earns a
challenge ACK and is dropped (RFC 5961 §4.2). Challenge ACKs are rate limited (RFC 5961 §7).
"""

from __future__ import annotations

from enum import Enum
from typing import Final

CHALLENGE_INTERVAL: Final = 0.5
"""Seconds between two challenge ACKs of one session (Linux's tcp_invalid_ratelimit)."""


class RstCheck(Enum):
    """What to do with an inbound RST (RFC 5961 §3.2)."""

    ACCEPT = "accept"
    CHALLENGE = "challenge"
    DROP = "drop"


def check_rst(seq: int, exact: tuple[int, ...], rcv_nxt: int, window: int) -> RstCheck:
    """RFC 5961 §3.2 for an RST at wire offset `seq`: ACCEPT when it is one of the `exact` offsets
    (the next expected byte, or the acknowledgment we last sent), CHALLENGE when it falls inside
    the receive window, DROP otherwise."""
    if seq in exact:
        return RstCheck.ACCEPT
    if rcv_nxt <= seq < rcv_nxt + max(window, 1):
        return RstCheck.CHALLENGE
    return RstCheck.DROP


class ChallengeLimiter:
    """At most one challenge ACK per CHALLENGE_INTERVAL (RFC 5961 §7)."""

    __slots__ = ("_last",)

    def __init__(self) -> None:
        self._last: float | None = None

    def allow(self, now: float) -> bool:
        """Whether a challenge ACK may go out at `now` (and count it if so)."""
        if self._last is not None and now - self._last < CHALLENGE_INTERVAL:
            return False
        self._last = now
        return True
