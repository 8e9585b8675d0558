"""What the engine tells the shell to do with a queued packet."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Action(Enum):
    """The verdict's action."""

    ACCEPT = "accept"
    DROP = "drop"


@dataclass(frozen=True, slots=True)
class Verdict:
    """ACCEPT or DROP, and for ACCEPT optionally the bytes that replace the packet."""

    action: Action
    packet: bytes | None = None


ACCEPT = Verdict(Action.ACCEPT)
DROP = Verdict(Action.DROP)
