"""Events the engine reports for observation (logs, metrics, tests); never key material."""

from __future__ import annotations

from dataclasses import dataclass

from .flow import FlowKey


@dataclass(frozen=True, slots=True)
class Event:
    """Base of all events."""

    flow: FlowKey


@dataclass(frozen=True, slots=True)
class EnoNegotiated(Event):
    """RFC 8547 §4.6: both SYNs carried a valid TEP; `role` is "A" or "B"."""

    tep: str
    role: str


@dataclass(frozen=True, slots=True)
class FellBackToPlain(Event):
    """The connection stays plain TCP (RFC 8547 §4.6), with the reason."""

    reason: str


@dataclass(frozen=True, slots=True)
class SessionEstablished(Event):
    """Keys exist: every payload byte from now on is framed (RFC 8548 §3.3, §3.6)."""

    session_id: str
    aead: str
    resumed: bool


@dataclass(frozen=True, slots=True)
class SessionAborted(Event):
    """The connection was reset toward both ends (RFC 8548 §3.6, §3.7)."""

    reason: str


@dataclass(frozen=True, slots=True)
class SessionClosed(Event):
    """Both directions ended with an authenticated FIN, or a reset was seen."""

    reason: str


@dataclass(frozen=True, slots=True)
class SessionExpired(Event):
    """The session left the table (linger or idle timeout)."""
