"""One direction of a captured TCP connection, reassembled into its byte stream (offline tool).

Stream offsets count from the first payload byte after the SYN (ISN+1), the framing-stream offsets
of RFC 8548 §3.6 (docs/protocol.md T1). When the capture starts mid-connection the origin is
the first payload byte seen instead, and `offsets_exact` is False.

Data is delivered in order to a sink, once per byte: retransmitted and overlapping bytes are dropped
(first arrival wins), reordered segments wait (bounded by `hold_limit`). A hole that cannot fill (the
capture lost the segment, or the hold limit was reached) is reported as a gap and skipped.

Retransmitted bytes are compared with what was seen earlier at the same offset (the last
`history_limit` bytes delivered, and pieces still held): TCP resends the same bytes, and tcpcrypt
resends frames byte-identical (RFC 8548 §3.6), so a difference means a forgery or a broken sender;
it goes to `on_conflict`.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass

from ..core.seqmap import to_offset, to_seq


@dataclass(frozen=True, slots=True)
class Gap:
    """Bytes of the stream missing from the capture: [offset, offset + length).

    `packet` is the packet whose data came right after the gap (0 when the gap is at the end of the
    capture, known only from the peer's acknowledgments or the FIN).
    """

    offset: int
    length: int
    packet: int


DataSink = Callable[[int, bytes, int], None]  # (offset, data, packet number)
GapSink = Callable[[Gap], None]
ConflictSink = Callable[[int, int, int], None]  # (offset, length of the differing span, packet number)


class StreamReassembler:
    """In-order delivery of one direction's payload bytes, coping with loss, reordering and repeats."""

    def __init__(self, on_data: DataSink, on_gap: GapSink, isn: int | None = None,
                 hold_limit: int = 32 << 20, on_conflict: ConflictSink | None = None,
                 history_limit: int = 8 << 20) -> None:
        self._on_data = on_data
        self._on_gap = on_gap
        self._on_conflict = on_conflict
        self._history = bytearray()  # the last bytes delivered, ending at `next`
        self._history_limit = history_limit
        self.differing_bytes = 0
        self.base: int | None = None if isn is None else to_seq(1, isn)
        self.offsets_exact = isn is not None
        self.next = 0
        self._held: dict[int, tuple[bytes, int]] = {}
        self._heap: list[int] = []
        self._held_bytes = 0
        self._hold_limit = hold_limit
        self.repeated_bytes = 0
        self.fin_offset: int | None = None
        self.acked: int | None = None  # highest offset acknowledged by the peer

    def offset_of(self, seq: int) -> int:
        """The stream offset of sequence number `seq`, unwrapped near the current position."""
        assert self.base is not None
        return to_offset(seq, self.base, self.next)

    def add(self, seq: int, payload: bytes, packet: int, fin: bool = False) -> None:
        """Take one segment's payload (and FIN flag)."""
        if self.base is None:
            if not payload:
                return
            self.base = seq
        offset = self.offset_of(seq)
        if fin and self.fin_offset is None:
            self.fin_offset = offset + len(payload)
        if not payload:
            return
        end = offset + len(payload)
        if offset < self.next:
            self._compare(offset, payload[: self.next - offset], packet)
        if end <= self.next:
            self.repeated_bytes += len(payload)
            return
        if offset < self.next:
            self.repeated_bytes += self.next - offset
            payload = payload[self.next - offset :]
            offset = self.next
        if offset == self.next:
            self._deliver(offset, payload, packet)
            if self._held:
                self._drain()
            return
        held = self._held.get(offset)
        if held is not None:
            common = min(len(held[0]), len(payload))
            if held[0][:common] != payload[:common]:
                self._conflict(offset, held[0][:common], payload[:common], packet)
            if len(held[0]) >= len(payload):
                self.repeated_bytes += len(payload)
                return
            self._held_bytes -= len(held[0])
        else:
            heapq.heappush(self._heap, offset)
        self._held[offset] = (payload, packet)
        self._held_bytes += len(payload)
        if self._held_bytes > self._hold_limit:
            self._skip_gap()

    def ack(self, ack: int) -> None:
        """Note an acknowledgment number sent by the peer for this direction."""
        if self.base is None:
            return
        offset = self.offset_of(ack)
        if self.acked is None or offset > self.acked:
            self.acked = offset

    def _drain(self) -> None:
        while self._heap and self._heap[0] <= self.next:
            offset = heapq.heappop(self._heap)
            payload, packet = self._held.pop(offset)
            self._held_bytes -= len(payload)
            end = offset + len(payload)
            if offset < self.next:
                self._compare(offset, payload[: self.next - offset], packet)
            if end <= self.next:
                self.repeated_bytes += len(payload)
                continue
            if offset < self.next:
                self.repeated_bytes += self.next - offset
                payload = payload[self.next - offset :]
                offset = self.next
            self._deliver(offset, payload, packet)

    def _deliver(self, offset: int, payload: bytes, packet: int) -> None:
        self.next = offset + len(payload)
        if self._on_conflict is not None:
            self._history += payload
            if len(self._history) > 2 * self._history_limit:
                del self._history[: len(self._history) - self._history_limit]
        self._on_data(offset, payload, packet)

    def _compare(self, offset: int, repeat: bytes, packet: int) -> None:
        """`repeat` (bytes before `next`) against what was delivered there, where still known."""
        if self._on_conflict is None:
            return
        known_from = self.next - len(self._history)
        start = max(offset, known_from)
        if start >= offset + len(repeat):
            return
        earlier = self._history[start - known_from : start - known_from + offset + len(repeat) - start]
        self._conflict(start, bytes(earlier), repeat[start - offset :], packet)

    def _conflict(self, offset: int, earlier: bytes, later: bytes, packet: int) -> None:
        if earlier == later or self._on_conflict is None:
            return
        first = next(i for i in range(len(earlier)) if earlier[i] != later[i])
        last = max(i for i in range(len(earlier)) if earlier[i] != later[i])
        self.differing_bytes += sum(1 for x, y in zip(earlier, later, strict=True) if x != y)
        self._on_conflict(offset + first, last - first + 1, packet)

    def _skip_gap(self) -> None:
        offset = self._heap[0]
        packet = self._held[offset][1]
        self._on_gap(Gap(self.next, offset - self.next, packet))
        self.next = offset
        self._history.clear()  # nothing known before the gap's end any more
        self._drain()

    def finish(self) -> None:
        """End of capture: report the holes still open, including a missing tail the peer acknowledged."""
        while self._heap:
            self._skip_gap()
        end = self.next
        if self.fin_offset is not None and self.fin_offset > end:
            end = self.fin_offset
        if self.acked is not None:
            # the peer's ack covers the FIN as one sequence number
            acked = self.acked - 1 if self.fin_offset is not None and self.acked == self.fin_offset + 1 else self.acked
            end = max(end, acked)
        if self.base is not None and end > self.next:
            self._on_gap(Gap(self.next, end - self.next, 0))
            self.next = end
