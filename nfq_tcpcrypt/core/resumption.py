"""The resumption cache: session secrets kept for later resumption (RFC 8548 §3.5).

Per peer address and original session it keeps the next unused secret ss[i], its index, the TEP,
the AEAD (ambiguity 3 of spec/tcpcrypt.md: a resumed session uses the original AEAD) and our role
in the original session, which fixes our identifier half, our key direction and which nonce is
nonce_a. Secrets stay in memory only, in bytearrays that are zeroed when a secret is used up, and
never appear in `info()`, logs or events.

Index rules (§3.5): an active opener burns ss[i] the moment it offers it, whatever the outcome, so
the next offer uses i+1; a passive opener recognises resume[i] .. resume[i+LOOKAHEAD-1] (ambiguity 8)
and, when it agrees, erases every secret up to the one used. So an ss[i] never secures two
connections, and crossing SYNs that offer the same secret both fall back to a fresh key exchange.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from .constants import AEAD_NAMES, TEP_NAMES, Aead, Tep
from .kex import next_session_secret, resume_identifier

LOOKAHEAD = 4


@dataclass(frozen=True, slots=True)
class Resumable:
    """What one resumption needs: the secret ss[i] and the original session's parameters."""

    ss: bytes = field(repr=False)
    resume_id: bytes  # resume[i], 18 bytes
    tep: Tep
    aead: Aead
    original_role: str  # "A" or "B" in the session that produced ss[0]

    @property
    def our_half(self) -> bytes:
        """The identifier half we send (RFC 8548 §3.5: original A sends bytes 0..8)."""
        return self.resume_id[:9] if self.original_role == "A" else self.resume_id[9:]

    @property
    def peer_half(self) -> bytes:
        """The identifier half the peer sends."""
        return self.resume_id[9:] if self.original_role == "A" else self.resume_id[:9]


class _Entry:
    __slots__ = ("peer", "ss", "index", "tep", "aead", "original_role", "expires_at", "uses")

    def __init__(self, peer: bytes, ss: bytes, tep: Tep, aead: Aead, role: str, expires_at: float) -> None:
        self.peer = peer
        self.ss = bytearray(ss)  # ss[index]: the next unused secret
        self.index = 1
        self.tep = tep
        self.aead = aead
        self.original_role = role
        self.expires_at = expires_at
        self.uses = 0

    def advance(self, steps: int) -> None:
        """Move to ss[index + steps], zeroing the secrets left behind."""
        for _ in range(steps):
            nxt = next_session_secret(bytes(self.ss))
            self.ss[:] = bytes(len(self.ss))
            self.ss = bytearray(nxt)
            self.index += 1

    def resumable(self, ahead: int = 0) -> Resumable:
        ss = bytes(self.ss)
        for _ in range(ahead):
            ss = next_session_secret(ss)
        return Resumable(ss, resume_identifier(ss), self.tep, self.aead, self.original_role)

    def wipe(self) -> None:
        self.ss[:] = bytes(len(self.ss))

    def __repr__(self) -> str:
        return f"_Entry(index={self.index}, tep={self.tep.name}, uses={self.uses})"


class ResumptionCache:
    """Bounded (LRU), expiring store of session secrets per peer (RFC 8548 §3.5)."""

    def __init__(self, max_entries: int = 4096, ttl: float = 3600.0) -> None:
        self.max_entries = max_entries
        self.ttl = ttl
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._next_key = 0
        self.flushes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def store(self, peer: bytes, ss0: bytes, tep: Tep, aead: Aead, role: str, now: float) -> None:
        """Cache ss[1] of a fresh session (ss[0] itself is not kept, §3.5)."""
        entry = _Entry(peer, next_session_secret(ss0), tep, aead, role, now + self.ttl)
        self._entries[self._next_key] = entry
        self._next_key += 1
        while len(self._entries) > self.max_entries:
            _, old = self._entries.popitem(last=False)
            old.wipe()

    def take_for_offer(self, peer: bytes, teps: tuple[Tep, ...], now: float) -> Resumable | None:
        """The secret to offer to `peer` on an active open, burned at once (§3.5: lowest unused i)."""
        self._expire(now)
        for key in reversed(self._entries):
            entry = self._entries[key]
            if entry.peer == peer and entry.tep in teps:
                offer = entry.resumable()
                entry.advance(1)
                entry.uses += 1
                self._entries.move_to_end(key)
                return offer
        return None

    def take_for_answer(self, peer: bytes, tep: int, half: bytes, now: float) -> Resumable | None:
        """The cached secret whose identifier half `half` the peer sent, if any, burned (§3.5)."""
        self._expire(now)
        for key, entry in self._entries.items():
            if entry.peer != peer or int(entry.tep) != tep:
                continue
            for ahead in range(LOOKAHEAD):
                candidate = entry.resumable(ahead)
                if candidate.peer_half == half:
                    entry.advance(ahead + 1)
                    entry.uses += 1
                    self._entries.move_to_end(key)
                    return candidate
        return None

    def flush(self, peer: bytes | None = None) -> int:
        """Forget every secret (of one peer, or all); return how many entries went."""
        keys = [k for k, e in self._entries.items() if peer is None or e.peer == peer]
        for key in keys:
            self._entries.pop(key).wipe()
        self.flushes += 1
        return len(keys)

    def info(self, now: float) -> list[dict[str, object]]:
        """Peers and counters, never secrets (`nfq-tcpcrypt cache show`)."""
        import ipaddress

        self._expire(now)
        return [
            {
                "peer": str(ipaddress.ip_address(e.peer)),
                "tep": TEP_NAMES[e.tep],
                "aead": AEAD_NAMES[e.aead],
                "original_role": e.original_role,
                "next_index": e.index,
                "resumptions": e.uses,
                "expires_in": round(e.expires_at - now, 1),
            }
            for e in self._entries.values()
        ]

    def _expire(self, now: float) -> None:
        for key in [k for k, e in self._entries.items() if e.expires_at <= now]:
            self._entries.pop(key).wipe()
