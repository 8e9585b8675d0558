"""Exceptions of the core; each protocol error carries its remedy."""

from __future__ import annotations

from enum import Enum


class Disposition(Enum):
    """What the engine does with a connection after a protocol error."""

    DROP_SEGMENT = "drop-segment"
    RESET = "reset"


class TcpcryptError(Exception):
    """Base of every error the core raises."""


class MalformedSegment(TcpcryptError):
    """Bytes that a strict codec rejects."""


class ProtocolError(TcpcryptError):
    """A broken protocol rule; `disposition` says what to do about it."""

    def __init__(self, message: str, disposition: Disposition = Disposition.RESET) -> None:
        super().__init__(message)
        self.disposition = disposition


class LocalProtocolError(ProtocolError):
    """Our own misuse or a broken invariant: a bug, never caught by the engine."""


class RemoteProtocolError(ProtocolError):
    """The peer broke RFC 8547 or RFC 8548."""


class StackAnomaly(ProtocolError):
    """A local segment no TCP stack would send (a raw-socket program, a stale flow): dropped."""

    def __init__(self, message: str, disposition: Disposition = Disposition.DROP_SEGMENT) -> None:
        super().__init__(message, disposition)


class IntegrityError(RemoteProtocolError):
    """An AEAD tag did not verify (RFC 8548 §3.6): abort, never deliver the bytes."""


class ConfigError(TcpcryptError):
    """A configuration value that cannot work."""
