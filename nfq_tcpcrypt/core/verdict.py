"""What the engine tells the shell to do with a queued packet."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Final, NamedTuple

from .flow import Direction


class Action(Enum):
    """The verdict's action."""

    ACCEPT = "accept"
    DROP = "drop"


class Verdict(NamedTuple):
    """ACCEPT or DROP, and for ACCEPT optionally the bytes that replace the packet.

    `encrypted` says the packet belongs to a connection that negotiated encryption: the shell marks
    it so that conntrack remembers the connection, and the rules keep its packets from leaving in
    plaintext while no daemon runs (README: Security model). A NamedTuple: immutable, and cheap to
    make, as one is made for every packet.
    """

    action: Action
    packet: bytes | None = None
    encrypted: bool = False


def accept(packet: bytes | None, encrypted: bool = False) -> Verdict:
    """Verdict(Action.ACCEPT, packet, encrypted), made without the NamedTuple's `__new__`
    (interpreted Python, also when compiled)."""
    return tuple.__new__(Verdict, (Action.ACCEPT, packet, encrypted))


ACCEPT: Final = Verdict(Action.ACCEPT)
DROP: Final = Verdict(Action.DROP)
ACCEPT_ENCRYPTED: Final = Verdict(Action.ACCEPT, None, True)


class Injection(NamedTuple):
    """A packet the engine built, and which way it goes.

    OUTBOUND packets go to the wire: the shell marks them so they are neither queued nor tracked
    (conntrack never sees wire space). INBOUND packets go to our own stack: they are plaintext
    space, so the shell marks them to skip the queues but lets conntrack track them
    (docs/architecture.md, "Hooks, marks and conntrack").
    """

    packet: bytes
    direction: Direction


@dataclass(frozen=True, slots=True)
class PacketInfo:
    """What the queue tells about a packet beyond its bytes (README: Queue backends).

    `gso`: a GSO/GRO super-packet, segmented by the kernel after the verdict; `checksum_trusted`:
    the kernel verified its TCP checksum, or the packet was made on this host or forwarded with
    the checksum left for the kernel to fill in (NFQA_SKB_CSUMNOTREADY): nothing to verify. A
    queue that cannot tell (NetfilterQueue) gives UNKNOWN: verify, not GSO.
    """

    gso: bool = False
    checksum_trusted: bool = False


UNKNOWN: Final = PacketInfo()
