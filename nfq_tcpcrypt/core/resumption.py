"""The resumption cache: session secrets kept for later resumption (RFC 8548 §3.5).

Per peer address and original session it keeps the next unused secret ss[i], its index, the TEP,
the AEAD (docs/protocol.md T3: a resumed session uses the original AEAD) and our role
in the original session, which fixes our identifier half, our key direction and which nonce is
nonce_a. Secrets stay in memory only, in bytearrays that are zeroed when a secret is used up, and
never appear in `info()`, logs or events.

Index rules (§3.5): an active opener burns ss[i] the moment it offers it, whatever the outcome, so
the next offer uses i+1; a passive opener recognises resume[i] .. resume[i+LOOKAHEAD-1] (docs/protocol.md T8)
and, when it agrees, erases every secret up to the one used. So an ss[i] never secures two
connections, and crossing SYNs that offer the same secret both fall back to a fresh key exchange.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Final, Protocol

from .constants import AEAD_NAMES, TEP_NAMES, Aead, Role, Tep
from .kex import next_session_secret, resume_identifier

LOOKAHEAD: Final = 4


class Resumable:
    """What one resumption needs: the secret ss[i] and the original session's parameters.

    A plain class, not a dataclass: a compiled dataclass's constructor is interpreted Python,
    and one is made per resumed connection. Treat as immutable; `ss` never appears in the repr."""

    __slots__ = ("ss", "resume_id", "tep", "aead", "original_role")

    def __init__(self, ss: bytes, resume_id: bytes, tep: Tep, aead: Aead, original_role: Role) -> None:
        self.ss = ss
        self.resume_id = resume_id  # resume[i], 18 bytes
        self.tep = tep
        self.aead = aead
        self.original_role = original_role  # ours in the session that produced ss[0]

    @property
    def our_half(self) -> bytes:
        """The identifier half we send (RFC 8548 §3.5: original A sends bytes 0..8)."""
        return self.resume_id[:9] if self.original_role is Role.A else self.resume_id[9:]

    @property
    def peer_half(self) -> bytes:
        """The identifier half the peer sends."""
        return self.resume_id[9:] if self.original_role is Role.A else self.resume_id[:9]

    def __repr__(self) -> str:
        return (f"Resumable(resume_id={self.resume_id!r}, tep={self.tep!r}, aead={self.aead!r}, "
                f"original_role={self.original_role!r})")


class SecretCache(Protocol):
    """What a session and the engine use of a resumption cache: a ResumptionCache, or a worker's
    view of the supervisor's one (README: Workers)."""

    def __len__(self) -> int: ...

    def store(self, peer: bytes, ss0: bytes, tep: Tep, aead: Aead, role: Role, now: float) -> None: ...

    def take_for_offer(self, peer: bytes, teps: tuple[Tep, ...], now: float) -> Resumable | None: ...

    def take_for_answer(self, peer: bytes, tep: int, half: bytes, now: float) -> Resumable | None: ...

    def flush(self, peer: bytes | None = None) -> int: ...

    def info(self, now: float) -> list[dict[str, object]]: ...


class _Entry:
    __slots__ = ("peer", "window", "ids", "index", "tep", "aead", "original_role", "expires_at", "uses", "halves",
                 "_peer_half")

    def __init__(self, peer: bytes, ss: bytes, tep: Tep, aead: Aead, role: Role, expires_at: float) -> None:
        self.peer = peer
        # ss[index .. index+LOOKAHEAD-1] and their resume identifiers: each derived once, when the
        # window reaches it (all follow from ss[index], which the entry holds anyway); a secret
        # left behind is zeroed.
        self.window = [bytearray(ss)]
        self.ids = [resume_identifier(ss)]
        self.index = 1
        self.tep = tep
        self.aead = aead
        self.original_role = role
        self.expires_at = expires_at
        self.uses = 0
        # The peer's identifier halves of the window (Resumable.peer_half); `fill` extends the
        # window to LOOKAHEAD, ahead of need while the daemon is idle (ResumptionCache.fill_one).
        self._peer_half: tuple[int, int] = (9, 18) if role is Role.A else (0, 9)
        a, b = self._peer_half
        self.halves = [self.ids[0][a:b]]

    @property
    def ss(self) -> bytearray:
        """ss[index]: the next unused secret."""
        return self.window[0]

    def fill(self) -> None:
        """Extend the window to LOOKAHEAD secrets and note the halves a peer may send next."""
        while len(self.window) < LOOKAHEAD:
            self._derive()

    def _derive(self) -> None:
        """The next secret after the window's last, its identifier and the peer's half of it."""
        ss = next_session_secret(self.window[-1])
        self.window.append(bytearray(ss))
        rid = resume_identifier(ss)
        self.ids.append(rid)
        a, b = self._peer_half
        self.halves.append(rid[a:b])

    def _resumable(self, ahead: int) -> Resumable:
        return Resumable(bytes(self.window[ahead]), self.ids[ahead], self.tep, self.aead, self.original_role)

    def advance(self, steps: int) -> None:
        """Move to ss[index + steps], zeroing the secrets left behind; the window is extended
        again by `fill` (the cache calls it ahead of need, or before a lookup that needs it)."""
        for _ in range(steps):
            if len(self.window) == 1:
                self._derive()
            left = self.window.pop(0)
            left[:] = bytes(len(left))
            self.ids.pop(0)
            self.halves.pop(0)
            self.index += 1

    def resumable(self, ahead: int = 0) -> Resumable:
        if ahead < len(self.window):
            return self._resumable(ahead)
        ss: bytes | bytearray = self.window[-1]
        for _ in range(ahead - len(self.window) + 1):
            ss = next_session_secret(ss)
        return Resumable(bytes(ss), resume_identifier(ss), self.tep, self.aead, self.original_role)

    def __deepcopy__(self, memo: dict[int, object]) -> _Entry:
        """The same entry (a cloned machine's cache); spelled out, as copy.deepcopy cannot copy a
        compiled class without arguments for its constructor."""
        clone = _Entry(self.peer, bytes(self.window[0]), self.tep, self.aead, self.original_role, self.expires_at)
        clone.window = [bytearray(ss) for ss in self.window]
        clone.ids = list(self.ids)
        clone.index, clone.uses, clone.halves = self.index, self.uses, list(self.halves)
        return clone

    def wipe(self) -> None:
        for ss in self.window:
            ss[:] = bytes(len(ss))

    def __repr__(self) -> str:
        return f"_Entry(index={self.index}, tep={self.tep.name}, uses={self.uses})"


class ResumptionCache:
    """Bounded (LRU, and per peer), expiring store of session secrets (RFC 8548 §3.5).

    Lookups cost no key derivation: each entry keeps the identifier halves the peer may send next,
    indexed by (peer, half), so a SYN with a bogus identifier costs one dictionary lookup.

    Deriving those next secrets and halves is work no packet waits for: a stored or used entry is
    noted as unfilled, and `fill_one` (Engine.prepare, while no packet waits) extends its window;
    a lookup by a peer whose entries are still unfilled fills them first, so the answer is the same.
    """

    def __init__(self, max_entries: int = 4096, ttl: float = 3600.0, per_peer: int = 16) -> None:
        self.max_entries = max_entries
        self.ttl = ttl
        self.per_peer = per_peer
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._by_peer: dict[bytes, list[int]] = {}  # entry keys of each peer, oldest first
        self._by_half: dict[tuple[bytes, bytes], int] = {}  # (peer, identifier half) -> entry key
        self._next_key = 0
        self._next_expiry = 0.0
        self._unfilled: dict[int, None] = {}  # entry keys whose window is short of LOOKAHEAD, oldest first
        self.flushes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def store(self, peer: bytes, ss0: bytes, tep: Tep, aead: Aead, role: Role, now: float) -> None:
        """Cache ss[1] of a fresh session (ss[0] itself is not kept, §3.5); a peer's oldest entry
        goes when it has `per_peer` already, the least recently used one when the cache is full."""
        entry = _Entry(peer, next_session_secret(ss0), tep, aead, role, now + self.ttl)
        key = self._next_key
        self._next_key += 1
        self._entries[key] = entry
        self._by_peer.setdefault(peer, []).append(key)
        self._index(key, entry)
        self._unfilled[key] = None
        while len(self._by_peer[peer]) > self.per_peer:
            self._remove(self._by_peer[peer][0])
        while len(self._entries) > self.max_entries:
            self._remove(next(iter(self._entries)))

    def take_for_offer(self, peer: bytes, teps: tuple[Tep, ...], now: float) -> Resumable | None:
        """The secret to offer to `peer` on an active open, burned at once (§3.5: lowest unused i)."""
        self._expire(now)
        best = -1
        for key in reversed(self._by_peer.get(peer, ())):  # at most per_peer, latest used first
            candidate = self._entries[key]
            if candidate.tep in teps and candidate.expires_at > now:
                best = key
                break
        if best < 0:
            return None
        entry = self._entries[best]
        offer = entry.resumable()
        self._advance(best, entry, 1)
        entry.uses += 1
        self._touch(best, entry)
        return offer

    def take_for_answer(self, peer: bytes, tep: int, half: bytes, now: float) -> Resumable | None:
        """The cached secret whose identifier half `half` the peer sent, if any, burned (§3.5)."""
        self._expire(now)
        if self._unfilled:
            for unfilled in self._by_peer.get(peer, ()):
                if unfilled in self._unfilled:
                    self._fill(unfilled)
        key = self._by_half.get((peer, bytes(half)))
        if key is None:
            return None
        entry = self._entries[key]
        if int(entry.tep) != tep or entry.expires_at <= now:
            return None
        ahead = entry.halves.index(bytes(half))
        candidate = entry.resumable(ahead)
        self._advance(key, entry, ahead + 1)
        entry.uses += 1
        self._touch(key, entry)
        return candidate

    @property
    def wanted(self) -> bool:
        """Whether some entry's window waits to be extended (`fill_one`)."""
        return bool(self._unfilled)

    def fill_one(self) -> bool:
        """Extend one unfilled entry's window to LOOKAHEAD (RFC 8548 §3.5: the next secrets and
        identifiers), ahead of need; False when none waits."""
        while self._unfilled:
            key = next(iter(self._unfilled))
            if key in self._entries:
                self._fill(key)
                return True
            del self._unfilled[key]
        return False

    def _fill(self, key: int) -> None:
        del self._unfilled[key]
        entry = self._entries[key]
        known = len(entry.halves)
        entry.fill()
        self._index(key, entry, entry.halves[known:])

    def _advance(self, key: int, entry: _Entry, steps: int) -> None:
        """`entry` moves `steps` secrets on: the halves it leaves behind leave the index, the
        ones derived on the way (a window shorter than `steps`) join it; `fill` comes later."""
        known = len(entry.halves)
        self._unindex(key, entry, entry.halves[:steps])
        entry.advance(steps)
        self._index(key, entry, entry.halves[max(known - steps, 0):])
        self._unfilled[key] = None

    def flush(self, peer: bytes | None = None) -> int:
        """Forget every secret (of one peer, or all); return how many entries went."""
        keys = [k for k, e in self._entries.items() if peer is None or e.peer == peer]
        for key in keys:
            self._remove(key)
        self.flushes += 1
        return len(keys)

    def info(self, now: float) -> list[dict[str, object]]:
        """Peers and counters, never secrets (`nfq-tcpcrypt cache show`)."""
        import ipaddress

        self._expire(now, force=True)
        return [
            {
                "peer": str(ipaddress.ip_address(e.peer)),
                "tep": TEP_NAMES[e.tep],
                "aead": AEAD_NAMES[e.aead],
                "original_role": e.original_role.value,
                "next_index": e.index,
                "resumptions": e.uses,
                "expires_in": round(e.expires_at - now, 1),
            }
            for e in self._entries.values()
        ]

    def _touch(self, key: int, entry: _Entry) -> None:
        """`key` was just used: most recent, in the cache and among its peer's entries."""
        self._entries.move_to_end(key)
        keys = self._by_peer[entry.peer]
        keys.remove(key)
        keys.append(key)

    def _index(self, key: int, entry: _Entry, halves: list[bytes] | None = None) -> None:
        """Index `halves` of `entry` (all of them by default) under `key`."""
        for half in entry.halves if halves is None else halves:
            self._by_half[(entry.peer, half)] = key

    def _unindex(self, key: int, entry: _Entry, halves: list[bytes] | None = None) -> None:
        """Remove `halves` of `entry` (all of them by default) from the index, where they are `key`'s."""
        for half in entry.halves if halves is None else halves:
            if self._by_half.get((entry.peer, half)) == key:
                del self._by_half[(entry.peer, half)]

    def _remove(self, key: int) -> None:
        entry = self._entries.pop(key)
        self._unfilled.pop(key, None)
        self._unindex(key, entry)
        keys = self._by_peer[entry.peer]
        keys.remove(key)
        if not keys:
            del self._by_peer[entry.peer]
        entry.wipe()

    def _expire(self, now: float, force: bool = False) -> None:
        """Drop expired entries: a full pass at most once a second (lookups check expiry anyway)."""
        if not force and now < self._next_expiry:
            return
        self._next_expiry = now + 1.0
        for key in [k for k, e in self._entries.items() if e.expires_at <= now]:
            self._remove(key)
