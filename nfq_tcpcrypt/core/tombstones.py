"""Tombstones: what the engine remembers of an encrypted connection after its session left the table.

Once a connection negotiated ENO none of its bytes may cross the wire in plaintext (README: Security
model). A session leaves the table after its idle timeout or its linger; the local stack may still
hold the connection and write to it later. Its packets then meet a tombstone instead of nothing:
the engine resets both ends and drops the packet (fail closed) rather than passing plaintext.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Final

from .flow import FlowKey

TOMBSTONE_BYTES: Final = 200
"""Approximate memory of one tombstone (key, entry and dict slot), for the documented bounds."""


@dataclass(frozen=True, slots=True)
class Tombstone:
    """Enough of a dead session to reset the peer in wire space: our next wire sequence number."""

    wire_seq: int | None
    expires: float


class Tombstones:
    """A bounded, expiring set of tombstones; the oldest go first when full."""

    def __init__(self, limit: int, ttl: float) -> None:
        self.limit = limit
        self.ttl = ttl
        self._entries: OrderedDict[FlowKey, Tombstone] = OrderedDict()
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, flow: FlowKey, wire_seq: int | None, now: float) -> None:
        """Remember `flow` as once encrypted until `now + ttl`."""
        self._entries.pop(flow, None)
        self._entries[flow] = Tombstone(wire_seq, now + self.ttl)
        while len(self._entries) > self.limit:
            self._entries.popitem(last=False)
            self.evicted += 1

    def get(self, flow: FlowKey, now: float) -> Tombstone | None:
        """The live tombstone of `flow`, or None (an expired one is forgotten)."""
        entry = self._entries.get(flow)
        if entry is not None and entry.expires <= now:
            del self._entries[flow]
            return None
        return entry

    def discard(self, flow: FlowKey) -> None:
        """Forget `flow` (our stack opened a new connection on the same 4-tuple)."""
        self._entries.pop(flow, None)

    def expire(self, now: float) -> float | None:
        """Forget expired tombstones; return the next expiry, or None."""
        entries = self._entries
        while entries:
            flow, entry = next(iter(entries.items()))
            if entry.expires > now:
                return entry.expires
            del entries[flow]
        return None
