"""Events the engine reports for observation (logs, metrics, tests); never key material.

Frozen dataclasses (fields, equality, hash and repr as dataclasses make them) whose constructors
are written out: compiled, a dataclass's generated `__init__` stays interpreted Python, and each
engine makes several events per connection. `object.__setattr__` sets a frozen instance's
fields, as the generated constructor does.
"""

from __future__ import annotations

from dataclasses import dataclass

from .flow import FlowKey


@dataclass(frozen=True, slots=True, init=False)
class Event:
    """Base of all events."""

    flow: FlowKey

    def __init__(self, flow: FlowKey) -> None:
        object.__setattr__(self, "flow", flow)


@dataclass(frozen=True, slots=True, init=False)
class EnoNegotiated(Event):
    """RFC 8547 §4.6: both SYNs carried a valid TEP; `role` is "A" or "B"."""

    tep: str
    role: str

    def __init__(self, flow: FlowKey, tep: str, role: str) -> None:
        object.__setattr__(self, "flow", flow)
        object.__setattr__(self, "tep", tep)
        object.__setattr__(self, "role", role)


@dataclass(frozen=True, slots=True, init=False)
class FellBackToPlain(Event):
    """The connection stays plain TCP (RFC 8547 §4.6), with the reason."""

    reason: str

    def __init__(self, flow: FlowKey, reason: str) -> None:
        object.__setattr__(self, "flow", flow)
        object.__setattr__(self, "reason", reason)


@dataclass(frozen=True, slots=True, init=False)
class SessionEstablished(Event):
    """Keys exist: every payload byte from now on is framed (RFC 8548 §3.3, §3.6)."""

    session_id: str
    aead: str
    resumed: bool

    def __init__(self, flow: FlowKey, session_id: str, aead: str, resumed: bool) -> None:
        object.__setattr__(self, "flow", flow)
        object.__setattr__(self, "session_id", session_id)
        object.__setattr__(self, "aead", aead)
        object.__setattr__(self, "resumed", resumed)


@dataclass(frozen=True, slots=True, init=False)
class SessionAborted(Event):
    """The connection was reset toward both ends (RFC 8548 §3.6, §3.7)."""

    reason: str

    def __init__(self, flow: FlowKey, reason: str) -> None:
        object.__setattr__(self, "flow", flow)
        object.__setattr__(self, "reason", reason)


@dataclass(frozen=True, slots=True, init=False)
class SessionClosed(Event):
    """Both directions ended with an authenticated FIN, or a reset was seen."""

    reason: str

    def __init__(self, flow: FlowKey, reason: str) -> None:
        object.__setattr__(self, "flow", flow)
        object.__setattr__(self, "reason", reason)


@dataclass(frozen=True, slots=True, init=False)
class SessionExpired(Event):
    """The session left the table (linger or idle timeout)."""
