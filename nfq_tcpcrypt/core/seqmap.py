"""Sequence arithmetic and the two byte spaces of one TCP stream (docs/architecture.md).

Per direction the local stack sees the *plain* space and the peer sees the *wire* space
(`[Init1 or Init2] + frame + frame + …`, RFC 8548 §3.3, §3.6). Both share the ISN. Internally every
position is an unbounded *offset* from ISN+1; 32-bit sequence numbers exist only at the edges.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections import deque
from typing import Final

from .aead import FrameCipher
from .constants import FRAME_HEADER_LEN, MAX_FRAME_DATA, MAX_INIT_LEN
from .outoforder import OutOfOrder
from .wire.tcpcrypt import frame_plaintext, frame_size

MASK: Final = 0xFFFFFFFF
HALF: Final = 1 << 31

DATA_AT: Final = FRAME_HEADER_LEN + 1
"""Plain byte i of a frame we sent sits at wire offset wire_start + DATA_AT + i: after the header
and the flags byte (RFC 8548 §4.2; AES-GCM and ChaCha20-Poly1305 encrypt in place, byte for byte);
the tag follows the data."""


def to_offset(seq: int, base: int, near: int) -> int:
    """The offset of 32-bit `seq` closest to offset `near`, where offset 0 is sequence `base`."""
    delta = (seq - base - near) & MASK
    if delta >= HALF:
        delta -= 1 << 32
    return near + delta


def to_seq(offset: int, base: int) -> int:
    """The 32-bit sequence number of `offset`."""
    return (base + offset) & MASK


class FrameRecord:
    """One sent frame: its plain and wire ranges (a FIN counts as one unit in both) and its bytes."""

    __slots__ = ("plain_start", "plain_end", "wire_start", "wire_end", "data", "fin")

    def __init__(self, plain_start: int, plain_len: int, wire_start: int, data: bytes, fin: bool) -> None:
        self.plain_start = plain_start
        self.plain_end = plain_start + plain_len + fin
        self.wire_start = wire_start
        self.wire_end = wire_start + len(data) + fin
        self.data = data
        self.fin = fin

    @property
    def data_end(self) -> int:
        """Plain offset after the frame's last data byte (before its FIN, if any)."""
        return self.plain_end - self.fin


class SendStream:
    """The local→wire direction: the frame log kept until the peer acknowledges it (docs/architecture.md).

    The log is a list in send order with a moving head, so lookups by plain or wire position are
    binary searches (retransmissions, SACK blocks, ICMP quotes) and acknowledged frames cost O(1).
    """

    def __init__(self, isn: int) -> None:
        self.base = (isn + 1) & MASK
        self.prefix = b""  # Init1 or Init2: wire offsets [0, len(prefix)) with no plain counterpart
        self.plain_next = 0
        self.wire_next = 0
        self.frames: list[FrameRecord] = []
        self._head = 0
        self.acked_plain = 0
        self.acked_wire = 0
        self.cipher: FrameCipher | None = None
        self.held: list[tuple[int, bytes, bool]] = []  # plaintext waiting for keys
        self.held_end = 0
        self.fin_framed = False
        self.gen = 0  # local key generation (RFC 8548 §3.8)
        self.rekey_next = False  # the next frame starts a new generation
        self.peer_sacks: list[tuple[int, int]] = []  # wire SACK blocks of the peer's latest ACK

    def set_prefix(self, prefix: bytes) -> None:
        """Put the Init message at the start of the wire stream (before any frame)."""
        self.prefix = prefix
        self.wire_next = len(prefix)

    @property
    def prefix_acked(self) -> bool:
        """Whether the peer has acknowledged the whole Init message."""
        return self.acked_wire >= len(self.prefix)

    @property
    def unacked(self) -> int:
        """Frames still in the log."""
        return len(self.frames) - self._head

    def new_frame(self, data: bytes, fin: bool, size: int = MAX_FRAME_DATA) -> list[FrameRecord]:
        """Frame new plaintext at the end of the stream (RFC 8548 §3.6), FINp on the last if `fin`;
        at most `size` plain bytes per frame."""
        assert self.cipher is not None
        size = max(1, min(size, MAX_FRAME_DATA))
        records = []
        while True:
            chunk, data = data[:size], data[size:]
            last = not data
            frame = self.cipher.seal(self.wire_next, frame_plaintext(chunk, fin and last), self.rekey_next)
            self.rekey_next = False
            record = FrameRecord(self.plain_next, len(chunk), self.wire_next, frame, fin and last)
            self.frames.append(record)
            self.plain_next = record.plain_end
            self.wire_next = record.wire_end
            records.append(record)
            if last:
                break
        self.fin_framed = self.fin_framed or fin
        return records

    def covering(self, start: int, end: int) -> list[FrameRecord]:
        """Logged frames that overlap plain range [start, end) (a retransmission, docs/architecture.md)."""
        frames = self.frames
        i = bisect_left(frames, start, lo=self._head, key=_plain_end)
        while i < len(frames) and frames[i].plain_end == start and frames[i].plain_start < start:
            i += 1  # ends exactly where the range starts; empty frames at `start` stay included
        out = []
        while i < len(frames) and frames[i].plain_start < end:
            out.append(frames[i])
            i += 1
        return out

    def wire_slice(self, start: int, end: int) -> tuple[int, bytes, bool] | None:
        """(wire offset, bytes, fin) of the logged wire bytes that carry plain range [start, end):
        byte-identical slices of the frames (a frame may span segments, RFC 8548 §4.2), so that
        a retransmission stays about the size the stack chose (docs/architecture.md).

        A slice that starts at a frame's first byte takes its header, one that reaches a frame's
        last data byte takes its tag (and its FIN when the range covers it); None if no logged
        frame overlaps the range. One that starts inside a frame starts DATA_AT bytes early: the
        kernel cut the frame's super-packet at our stack's segment size, so the wire segment
        that carried the start of this plain segment began DATA_AT bytes before it, and those
        bytes are shown to our stack as held when only that wire segment is missing
        (sack_to_plain)."""
        frames = self.covering(start, end)
        if not frames:
            return None
        first, last = frames[0], frames[-1]
        if start <= first.plain_start:
            lo = first.wire_start
        else:
            lo = first.wire_start + min(start, first.data_end) - first.plain_start
        fin = False
        if end < last.data_end:
            hi = last.wire_start + DATA_AT + max(end - last.plain_start, 0)
        else:
            hi = last.wire_start + len(last.data)
            fin = last.fin and end >= last.plain_end
        if len(frames) == 1:
            data = first.data[lo - first.wire_start : hi - first.wire_start]
        else:
            data = b"".join(r.data for r in frames)[lo - first.wire_start : hi - first.wire_start]
        return lo, data, fin

    def head_holes(self) -> list[tuple[int, bytes, bool]]:
        """(wire offset, bytes, fin) of what the peer lacks of the first unacknowledged frame, from
        its latest SACK blocks: the gaps between them and the frame's tail after the last (the
        peer cannot open the frame, so it lacks something, maybe only the tail: lost, or cut at
        its stack's window). Empty when the blocks say nothing about that frame."""
        frames = self.frames
        if self._head >= len(frames) or not self.peer_sacks:
            return []
        f = frames[self._head]
        start, end = max(self.acked_wire, f.wire_start), f.wire_start + len(f.data)
        blocks = sorted((max(lo, start), min(hi, end)) for lo, hi in self.peer_sacks if hi > start and lo < end)
        if not blocks:
            return []
        out = []
        at = start
        for lo, hi in blocks:
            if lo > at:
                out.append((at, f.data[at - f.wire_start : lo - f.wire_start], False))
            at = max(at, hi)
        if at < end:
            out.append((at, f.data[at - f.wire_start :], f.fin))
        return out

    def wire_only_unacked(self) -> list[FrameRecord]:
        """Unacknowledged frames with no plain bytes and no FIN (empty rekey frames), from the
        first such frame to the end of the log, if nothing with plain bytes follows them."""
        frames = self.frames
        i = len(frames)
        while i > self._head and frames[i - 1].plain_start == frames[i - 1].plain_end:
            i -= 1
        return frames[i:]

    def plain_to_wire(self, plain: int) -> int:
        """Wire offset for a segment that starts at plain offset `plain` and carries no data."""
        if plain >= self.plain_next:
            return self.wire_next + (plain - self.plain_next)
        frames = self.frames
        i = bisect_left(frames, plain, lo=self._head, key=_plain_start)
        if i < len(frames):
            return frames[i].wire_start
        return self.acked_wire - (self.acked_plain - plain)

    def wire_to_plain(self, wire: int) -> int:
        """Plain offset of the frame holding wire offset `wire` (for quoted segments, ICMP)."""
        if wire >= self.wire_next:
            return self.plain_next
        frames = self.frames
        i = bisect_right(frames, wire, lo=self._head, key=_wire_end)
        if i < len(frames) and frames[i].wire_start <= wire:
            return frames[i].plain_start
        return self.acked_plain

    def sack_to_plain(self, left: int, right: int) -> tuple[int, int] | None:
        """The plain bytes whose wire bytes all lie in wire SACK block [left, right) (RFC 2018).

        Plain byte i of a frame is at wire_start + DATA_AT + i; the header counts as part of the
        frame's first data byte and the tag as part of its last, so a lost header or tag shows
        our stack a hole where a retransmission brings it back (wire_slice). A block that ends
        inside a frame's data is shown DATA_AT bytes longer (short of the last data byte): the
        kernel cut the frame at our stack's segment size, so the wire segment after the block
        holds the last DATA_AT bytes of one segment of our stack and the rest of the next. Only
        that next one then looks lost, not both, and its retransmission starts DATA_AT bytes
        early (wire_slice). The cumulative ACK
        stays on whole frames (ack_to_plain): the peer acknowledges only what it opened."""
        frames = self.frames
        i = bisect_right(frames, left, lo=self._head, key=_wire_end)
        j = bisect_left(frames, right, lo=i, key=_wire_start) - 1
        if i >= len(frames) or j < i:
            return None
        first, last = frames[i], frames[j]
        if left <= first.wire_start:
            lo = first.plain_start
        else:
            lo = first.plain_start + min(max(left - first.wire_start - DATA_AT, 1), first.data_end - first.plain_start)
        if right >= last.wire_end:
            hi = last.plain_end
        elif right >= last.wire_start + len(last.data):
            hi = last.data_end
        else:
            held = right - last.wire_start - DATA_AT  # data bytes of the last frame in the block
            held += DATA_AT if held > 0 else 0
            hi = last.plain_start + max(min(held, last.data_end - last.plain_start - 1), 0)
        return (lo, hi) if lo < hi else None

    def ack_to_plain(self, wire: int) -> int:
        """Translate the peer's acknowledgment (wire offset) and forget fully acknowledged frames."""
        if wire > self.acked_wire:
            self.acked_wire = min(wire, self.wire_next)
            frames = self.frames
            head = self._head
            n = len(frames)
            while head < n and frames[head].wire_end <= wire:
                head += 1
            if head > self._head:
                self.acked_plain = frames[head - 1].plain_end
            if head < n and frames[head].fin and wire == frames[head].wire_end - 1:
                self.acked_plain = frames[head].plain_end - 1
            if head > 256 and head * 2 > n:
                del frames[:head]
                head = 0
            self._head = head
        return self.acked_plain


def _plain_start(record: FrameRecord) -> int:
    return record.plain_start


def _plain_end(record: FrameRecord) -> int:
    return record.plain_end


def _wire_start(record: FrameRecord) -> int:
    return record.wire_start


def _wire_end(record: FrameRecord) -> int:
    return record.wire_end


class RecvStream:
    """The wire→local direction: reassembly, decryption and the plain↔wire checkpoints."""

    def __init__(self, isn: int) -> None:
        self.base = (isn + 1) & MASK
        self.wire_next = 0  # end of the contiguous wire bytes received
        self.buf = bytearray()  # received bytes not yet consumed, from wire offset buf_start
        self.buf_start = 0
        self.plain_next = 0  # next plain offset to deliver
        self.checkpoints: deque[tuple[int, int]] = deque([(0, 0)])  # (plain, wire) frame ends
        self.ooo = OutOfOrder()  # wire bytes beyond a gap, bounded (outoforder.py)
        self.cipher: FrameCipher | None = None
        self.fin_at: int | None = None  # wire offset of the peer's FIN
        self.finp = False  # a frame with FINp was verified (RFC 8548 §3.7)
        self.fin_delivered = False
        self.local_ack = 0  # highest plain offset the local stack acknowledged
        self.ack_floor = 0  # highest wire offset we acknowledged to the peer
        self.local_ack_wire = 0  # our stack's own acknowledgment, in wire space
        self.gen = 0  # remote key generation (RFC 8548 §3.8)
        self.fin_seen: int | None = None  # wire offset of a FIN that arrived, maybe ahead of a gap
        self.replay: deque[tuple[int, bytes]] = deque()  # delivered plaintext our stack has not acked
        self.redelivered_to = 0  # plain offset up to which lost plaintext was handed over again
        self.right_edge = 0xFFFF + MAX_INIT_LEN  # wire offset past our stack's receive window
        self.edge_known = False  # right_edge still the guess before our stack's first ACK
        self.widened = False  # right_edge is a frame's end past our stack's own (widen_edge)

    def add(self, wire: int, data: bytes, limit: int, now: float = 0.0) -> bool:
        """Take payload at wire offset `wire`; return False when nothing new could be used.

        Out-of-order data is held only within `limit` bytes of `wire_next` and within a memory
        budget of `limit` bytes, overhead counted (outoforder.py)."""
        end = wire + len(data)
        ooo = self.ooo
        if ooo:
            ooo.expire(now)
        if end <= self.wire_next:
            return False
        if wire > self.wire_next:
            ooo.add(wire, data, self.wire_next, limit, limit, now)
            return False
        new = data[self.wire_next - wire :]
        if ooo:
            ooo.check_in_order(self.wire_next, new)
        self.buf += new
        self.wire_next = end
        while ready := ooo.pop_ready(self.wire_next):
            for start, piece in ready:
                if start + len(piece) > self.wire_next:
                    self.buf += piece[self.wire_next - start :]
                    self.wire_next = start + len(piece)
        return True

    def widen_edge(self, wire: int = 0, data: bytes = b"") -> bool:
        """Move `right_edge` to the end of the frame that begins inside it at `buf_start`, its
        header read from the buffer or from `data` (at wire offset `wire`); returns whether it
        moved. A frame cut at our stack's right edge could never be opened, and our stack, shown
        nothing of it, would have no reason to offer a larger window: the connection would stall
        (docs/architecture.md: Sizes). One frame is at most 65,538 bytes: the bound stays."""
        start = self.buf_start
        if self.cipher is None or start >= self.right_edge:
            return False
        header = bytes(self.buf[:FRAME_HEADER_LEN])
        if len(header) < FRAME_HEADER_LEN:
            at = self.wire_next - wire  # `data` from there continues the buffer
            if at < 0:
                return False
            header += data[at : at + FRAME_HEADER_LEN - len(header)]
        size = frame_size(header)
        if size is None or start + size <= self.right_edge:
            return False
        self.right_edge = start + size
        self.widened = True
        return True

    def sack_blocks(self, limit: int) -> list[tuple[int, int]]:
        """Held out-of-order wire ranges as SACK blocks, the latest arrival first (RFC 2018 §4)."""
        return self.ooo.blocks(limit)

    def consume(self, n: int) -> bytes:
        """Remove `n` bytes from the front of the reassembly buffer."""
        with memoryview(self.buf) as view:
            chunk = bytes(view[:n])  # one copy (a bytearray slice would be a second)
        del self.buf[:n]
        self.buf_start += n
        return chunk

    def next_frame(self) -> tuple[int, bytes] | None:
        """(offset, frame bytes) of the next complete frame in the buffer, consumed, or None."""
        buf = self.buf
        size = frame_size(buf)
        if size is None or len(buf) < size:
            return None
        offset = self.buf_start
        return offset, self.consume(size)

    def delivered(self, plain_len: int, fin: bool = False) -> None:
        """Record that plaintext up to the current buffer start was delivered (a checkpoint)."""
        self.plain_next += plain_len + fin
        self.checkpoints.append((self.plain_next, self.buf_start + fin))

    def remember(self, plain_start: int, data: bytes) -> None:
        """Keep delivered plaintext until our stack acknowledges it (for redelivery)."""
        if data:
            self.replay.append((plain_start, data))

    def unacked_plaintext(self, limit: int) -> tuple[int, bytes]:
        """(plain offset, bytes) delivered but not yet acknowledged by our stack, at most `limit`."""
        out = bytearray()
        start = self.local_ack
        for at, data in self.replay:
            if at + len(data) <= start:
                continue
            out += data[max(start - at, 0) :]
            if len(out) >= limit:
                break
        return start, bytes(out[:limit])

    def plaintext(self, start: int, end: int) -> bytes:
        """Delivered plaintext of plain range [start, end) our stack has not acknowledged yet."""
        out = bytearray()
        for at, data in self.replay:
            if at >= end:
                break
            if at + len(data) > start:
                out += data[max(start - at, 0) : end - at]
        return bytes(out)

    def ack_to_wire(self, plain: int) -> int:
        """Translate the local stack's acknowledgment (plain offset) into a wire offset."""
        points = self.checkpoints
        if plain > self.local_ack:
            self.local_ack = plain
            replay = self.replay
            while replay and replay[0][0] + len(replay[0][1]) <= plain:
                replay.popleft()
        while len(points) > 1 and points[1][0] <= plain:
            points.popleft()
        first_plain, first_wire = points[0]
        wire = first_wire - (first_plain - plain) if plain < first_plain else first_wire
        if plain >= self.local_ack:
            self.local_ack_wire = wire
        if wire > self.ack_floor:
            self.ack_floor = wire
        return self.ack_floor  # never below an ACK we already sent

    def plain_to_wire(self, plain: int) -> int:
        """Wire offset near plain offset `plain` of delivered data (exact at frame boundaries)."""
        best_plain, best_wire = self.checkpoints[0]
        for point_plain, point_wire in self.checkpoints:
            if point_plain > plain:
                break
            best_plain, best_wire = point_plain, point_wire
        return best_wire + (plain - best_plain)

    def ack_delivered(self) -> int:
        """Acknowledge on the wire everything delivered to our stack, acknowledged by it or not.

        The ACKs we inject while a gap is open use this: acknowledging only what our (delayed-ACK)
        stack has acknowledged would show the peer a hole between that ACK and the first SACK
        block, and it would resend frames we hold. Delivered plaintext stays in `replay` until our
        stack acknowledges it, for the rare case that our stack drops it.
        """
        self.ack_floor = max(self.ack_floor, self.checkpoints[-1][1])
        return self.ack_floor
