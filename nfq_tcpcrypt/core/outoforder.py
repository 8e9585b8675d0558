"""Wire bytes held beyond a gap in the peer's stream, bounded (README: Security model).

Pieces are kept coalesced and sorted by wire offset, so a packet costs a binary search and at most
the pieces it touches; the SACK blocks are the pieces themselves (RFC 2018 §4: the block of the
latest arrival first). Bounds: data only within `max_ahead` bytes of the next expected offset (the
window we advertise), and a memory budget that counts every piece with its overhead.

No byte here is authenticated yet. Where a new piece overlaps held bytes and differs from them,
one of the two was forged, and only the frame's authentication could tell which: both are dropped
and no longer acknowledged, so the peer sends the genuine bytes again (a forged piece can no
longer keep the genuine one out). Pieces that wait longer than `ttl` are dropped as well (SACK
reneging, RFC 2018 §8), so that nothing stalls behind bytes that will never line up.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from typing import Final

PIECE_OVERHEAD: Final = 128
"""Bytes charged per held piece beyond its payload (list slots, bytearray header, timestamps)."""

HOLD_TTL: Final = 10.0
"""Seconds a piece may wait for its gap to fill before it is dropped (the peer resends it)."""


class Budget:
    """Bytes all sessions' out-of-order buffers may hold together (the daemon-wide bound)."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def allows(self, more: int) -> bool:
        """Whether `more` bytes still fit."""
        return self.used + more <= self.limit


class OutOfOrder:
    """Coalesced out-of-order pieces of one direction's wire stream.

    Three parallel lists sorted by offset; the live pieces are those from `_head` on, so that
    handing the first pieces over when a gap fills costs O(1) (the lists are cut now and then)."""

    __slots__ = ("starts", "pieces", "stamps", "cost", "latest", "dropped_conflicts", "dropped_expired",
                 "_check_at", "_head", "budget")

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.pieces: list[bytearray] = []
        self.stamps: list[float] = []  # when each piece last grew
        self.cost = 0
        self.latest: int | None = None  # a wire offset inside the piece that grew last
        self.dropped_conflicts = 0
        self.dropped_expired = 0
        self._check_at: float | None = None  # no piece can expire before this
        self._head = 0
        self.budget: Budget | None = None  # shared by every session of an engine, when set

    def __bool__(self) -> bool:
        return len(self.starts) > self._head

    def __len__(self) -> int:
        return len(self.starts) - self._head

    def add(self, wire: int, data: bytes, expected: int, max_ahead: int, limit: int, now: float) -> bool:
        """Hold `data` at `wire` (beyond `expected`); return whether it was kept."""
        if wire + len(data) > expected + max_ahead:
            return False
        starts, pieces, head = self.starts, self.pieces, self._head
        end = wire + len(data)
        i = bisect_right(starts, wire, lo=head) - 1
        if i < head or starts[i] + len(pieces[i]) < wire:
            i += 1  # no piece reaches `wire`: the first touched piece is the next one
        j = bisect_right(starts, end, lo=i)  # pieces i..j-1 overlap or touch [wire, end)
        for k in range(i, j):
            lo, hi = max(starts[k], wire), min(starts[k] + len(pieces[k]), end)
            if lo < hi and pieces[k][lo - starts[k] : hi - starts[k]] != data[lo - wire : hi - wire]:
                self._drop(i, j)
                self.dropped_conflicts += 1
                return False
        if i == j:
            if self.cost + len(data) + PIECE_OVERHEAD > limit or not self._fits(len(data) + PIECE_OVERHEAD):
                return False
            starts.insert(i, wire)
            pieces.insert(i, bytearray(data))
            self.stamps.insert(i, now)
            self._charge(len(data) + PIECE_OVERHEAD)
            self.latest = wire
            return True
        first, last_end = starts[i], max(starts[j - 1] + len(pieces[j - 1]), end)
        new_start = min(first, wire)
        grown = (last_end - new_start) - sum(len(pieces[k]) for k in range(i, j))
        delta = grown - (j - i - 1) * PIECE_OVERHEAD
        if self.cost + delta > limit or not self._fits(delta):
            return False
        if wire >= first and j == i + 1:
            piece = pieces[i]  # the usual case: the piece grows at its end, in place
            if end > first + len(piece):
                piece += data[first + len(piece) - wire :]
        else:
            merged = bytearray(last_end - new_start)
            merged[wire - new_start : end - new_start] = data
            for k in range(i, j):  # no conflict: the overlays agree wherever they overlap
                merged[starts[k] - new_start : starts[k] - new_start + len(pieces[k])] = pieces[k]
            starts[i:j] = [new_start]
            pieces[i:j] = [merged]
            self.stamps[i:j] = [now]
        self.stamps[i] = now
        self._charge(delta)
        self.latest = wire
        return True

    def check_in_order(self, wire: int, data: bytes) -> None:
        """In-order bytes at `wire` arrived: drop held pieces whose overlapping bytes differ."""
        end = wire + len(data)
        starts, pieces = self.starts, self.pieces
        i = max(bisect_right(starts, wire, lo=self._head) - 1, self._head)
        for k in reversed(range(i, bisect_left(starts, end, lo=i))):
            lo, hi = max(starts[k], wire), min(starts[k] + len(pieces[k]), end)
            if lo < hi and pieces[k][lo - starts[k] : hi - starts[k]] != data[lo - wire : hi - wire]:
                self._drop(k, k + 1)
                self.dropped_conflicts += 1

    def pop_ready(self, expected: int) -> list[tuple[int, bytearray]]:
        """The pieces that start at or before `expected` (their gap is filled), removed."""
        starts, head = self.starts, self._head
        if head >= len(starts) or starts[head] > expected:
            return []
        n = bisect_right(starts, expected, lo=head)
        ready = list(zip(starts[head:n], self.pieces[head:n], strict=True))
        for _, piece in ready:
            self._charge(-len(piece) - PIECE_OVERHEAD)
        for k in range(head, n):
            self.pieces[k] = _EMPTY  # release the bytes now; the slots go at the next cut
        self._head = n
        if n > 1024 and n * 2 > len(starts):
            del starts[:n], self.pieces[:n], self.stamps[:n]
            self._head = 0
        return ready

    def expire(self, now: float, ttl: float = HOLD_TTL) -> None:
        """Drop pieces that waited longer than `ttl` without growing (a scan at most once per
        `ttl`: stamps only grow, so the earliest possible expiry is a lower bound)."""
        if not self:
            self._check_at = None
            return
        if self._check_at is None:
            self._check_at = min(self.stamps[self._head :]) + ttl
        if now < self._check_at:
            return
        old = [k for k in range(self._head, len(self.stamps)) if self.stamps[k] + ttl <= now]
        for k in reversed(old):
            self._drop(k, k + 1)
            self.dropped_expired += 1
        self._check_at = min(self.stamps[self._head :]) + ttl if self else None

    def blocks(self, limit: int) -> list[tuple[int, int]]:
        """Up to `limit` held ranges as SACK blocks, the latest arrival's first (RFC 2018 §4)."""
        starts, pieces, head = self.starts, self.pieces, self._head
        first = list(range(head, min(len(starts), head + limit)))
        latest = self.latest
        if latest is not None:
            k = bisect_right(starts, latest, lo=head) - 1
            if k >= head and latest < starts[k] + len(pieces[k]):
                first = [k] + [n for n in first if n != k]
        return [(starts[k], starts[k] + len(pieces[k])) for k in first[:limit]]

    def clear(self) -> None:
        """Drop everything (the session ends): the budget gets its bytes back."""
        self._drop(self._head, len(self.starts))

    def _fits(self, more: int) -> bool:
        return self.budget is None or more <= 0 or self.budget.allows(more)

    def _charge(self, delta: int) -> None:
        self.cost += delta
        if self.budget is not None:
            self.budget.used += delta

    def _drop(self, i: int, j: int) -> None:
        for k in range(i, j):
            self._charge(-len(self.pieces[k]) - PIECE_OVERHEAD)
        del self.starts[i:j], self.pieces[i:j], self.stamps[i:j]


_EMPTY: Final = bytearray()
