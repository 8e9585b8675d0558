"""The fast queue backend (`--queue-backend fast`): our own NFQUEUE binding on a raw netlink socket.

Against NetfilterQueue it adds the queue flags (fail-open on a full queue, GSO super-packets),
whole-packet copies (up to 65,531 bytes), a receive buffer set with SO_RCVBUFFORCE, and verdicts
sent in batches: the verdicts of one drain go out together (one sendmsg per HOLD_MAX packets or
HOLD_SECONDS at most), and a run of plain accepts becomes one NFQNL_MSG_VERDICT_BATCH. Verdicts keep the packets'
order: a run of plain accepts is closed by a batch verdict before any other verdict follows. Its
packets have NetfilterQueue's surface (get_payload, set_payload, accept, drop), so shell/nfq.py's
QueuePair drives both backends, plus the kernel's metadata (`skb_info`: GSO, checksum not ready).

A packet's receive and the verdict of a drain's first packet are C (`_fastio.c`) when the package
is built compiled; the pure build, and the unit tests' fake sockets, read and write the same bytes
in Python (nfnetlink.py). README: Queue backends.
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from collections.abc import Callable
from typing import Any, Final, Protocol

from . import nfnetlink as nl

try:
    from . import _fastio
except ImportError:  # the pure build (setup.py): the Python reading (FastQueue._receive)
    NATIVE = False
else:
    NATIVE = True

logger = logging.getLogger(__name__)

RECV_SIZE: Final = 0x10000 + 4096
"""One datagram: the largest packet copy plus the headers and attributes around it."""

HOLD_MAX: Final = 32
"""Verdicts held before they go out even while more packets wait: a packet's verdict waits for at
most this many packets' handling, not for the whole drain."""

HOLD_SECONDS: Final = 100e-6
"""...and for at most this long (checked at each verdict). Under the engine (tens of µs per packet)
32 packets are over a millisecond: the burst would leave together, the peer's daemon would start on
it that much later, and at 1 % loss, where the round trip sets the rate, the fast backend kept less
of its loss-free rate than NetfilterQueue (README: Queue backends). Cheap packets (pass-through)
still go out up to HOLD_MAX at a time."""

SEND_CHUNK: Final = 128 * 1024
"""Verdict bytes gathered into one sendmsg before it goes (below the default netlink send buffer)."""

_SO_RCVBUFFORCE: Final = getattr(socket, "SO_RCVBUFFORCE", 33)


class NetlinkSocket(Protocol):
    """What FastQueue uses of its socket (a NETLINK_NETFILTER socket.socket; a fake in the unit tests)."""

    def recv_into(self, buffer: bytearray, /) -> int: ...
    def sendmsg(self, parts: list[bytes], /) -> int: ...
    def send(self, data: bytes, /) -> int: ...
    def recv(self, size: int, /) -> bytes: ...
    def settimeout(self, timeout: float | None, /) -> None: ...
    def setblocking(self, flag: bool, /) -> None: ...
    def fileno(self) -> int: ...
    def close(self) -> None: ...


Connect = Callable[[int, int, int], NetlinkSocket]
"""(queue number, max_len, sock_len) -> the bound socket."""

Received = tuple[int, bytes, int, int, int] | bytes | None
"""One datagram read: the usual packet's (id, payload, real length, skb_info, mark), any other
datagram's bytes (nfnetlink.parse), or None when the socket is empty."""


class FastPacket:
    """One queued packet; its verdict is recorded and sent with the others of its drain. It carries
    what the daemon uses of the kernel's metadata (`skb_info`: GSO, checksum not ready; `mark`)."""

    __slots__ = ("_queue", "packet_id", "payload", "cap_len", "skb_info", "mark", "_verdict", "_payload", "_mark")

    def __init__(self, queue: FastQueue, packet_id: int, payload: bytes, cap_len: int, skb_info: int = 0,
                 mark: int = 0) -> None:  # fmt: skip
        self._queue = queue
        self.packet_id = packet_id
        self.payload = payload
        self.cap_len = cap_len
        """The packet's real length (larger than len(payload) when the copy was cut)."""
        self.skb_info = skb_info
        """NFQA_SKB_* flags."""
        self.mark = mark
        self._verdict: int | None = None
        self._payload: bytes | None = None
        self._mark: int | None = None

    @classmethod
    def of(cls, queue: FastQueue, info: nl.QueuedPacket) -> FastPacket:
        """The packet `parse` read."""
        return cls(queue, info.packet_id, info.payload, info.cap_len, info.skb_info, info.mark)

    @property
    def id(self) -> int:
        """The kernel's packet id."""
        return self.packet_id

    @property
    def gso(self) -> bool:
        """A super-packet the kernel segments after the verdict."""
        return bool(self.skb_info & nl.NFQA_SKB_GSO)

    @property
    def csum_not_ready(self) -> bool:
        """Its transport checksum is left for the kernel (or us, after a rewrite) to fill in."""
        return bool(self.skb_info & nl.NFQA_SKB_CSUMNOTREADY)

    def get_payload(self) -> bytes:
        """The copied packet (the whole packet unless `get_payload_len() < cap_len`)."""
        return self.payload

    def get_payload_len(self) -> int:
        """The packet's length: the copy's when whole, the real (larger) one when the copy was cut."""
        return self.cap_len

    def get_mark(self) -> int:
        """The packet's mark."""
        return self.mark

    def set_payload(self, data: bytes) -> None:
        """Replace the packet's bytes with the verdict (at most 65,531: what a netlink attribute holds)."""
        if len(data) > nl.MAX_PAYLOAD:
            raise ValueError(f"a packet of {len(data)} bytes does not fit a verdict (at most {nl.MAX_PAYLOAD})")
        self._payload = bytes(data)

    def set_mark(self, mark: int) -> None:
        """Set the packet's mark with the verdict."""
        self._mark = mark

    def _give(self, verdict: int) -> None:
        if self._verdict is not None:
            raise RuntimeError("Verdict already given for this packet")
        self._verdict = verdict
        queue = self._queue
        pending = queue._pending
        if queue._eager and not pending:  # the drain's first packet: its verdict goes now
            queue._eager = False
            queue._send_one(self)
            return
        now = time.monotonic()
        if not pending:
            queue._held_since = now
        pending.append(self)
        if queue._eager or len(pending) >= queue.hold_max or now - queue._held_since >= queue.hold_seconds:
            queue._eager = False
            queue.flush()

    def accept(self) -> None:
        """Accept (with the new payload and mark, if set)."""
        self._give(nl.NF_ACCEPT)

    def drop(self) -> None:
        """Drop."""
        self._give(nl.NF_DROP)


class FastQueue:
    """One NFQUEUE bound on its own NETLINK_NETFILTER socket, with NetfilterQueue's method names."""

    def __init__(self, flags: int = 0, connect: Connect | None = None) -> None:
        """`flags`: NFQA_CFG_F_* set when binding (FAIL_OPEN, GSO); every other flag is cleared.
        `connect` opens and configures the socket (`_connect`: the kernel's; a fake in the unit tests)."""
        self.flags = flags
        self.queue_num: int | None = None
        self.hold_max = HOLD_MAX
        self.hold_seconds = HOLD_SECONDS
        self.enobufs = 0
        self.verdict_errors = 0
        self.recv_calls = 0
        self.verdict_sends = 0
        self._connect: Connect = self._netlink if connect is None else connect
        self._sock: NetlinkSocket | None = None
        self._fd = -1
        self._native = False
        """Receive and first verdicts through _fastio (a real socket, in a compiled build)."""
        self._callback: Callable[[Any], None] | None = None
        self._pending: list[FastPacket] = []
        self._held_since = 0.0
        """When the oldest verdict in `_pending` was given (time.monotonic())."""
        self._eager = False
        """The next verdict goes at once (the drain's first packet's)."""
        self._buffer = bytearray()
        """The Python path's receive buffer, made at its first receive (`_receive`): the C path has its own."""
        self._view = memoryview(self._buffer)
        self._seq = 0

    def bind(self, queue_num: int, callback: Callable[[Any], None], max_len: int = 1024, sock_len: int = 0) -> None:
        """Bind `queue_num`: copy whole packets, at most `max_len` waiting, our flags; `sock_len` is
        the receive buffer (SO_RCVBUFFORCE, as root; SO_RCVBUF when that is refused)."""
        sock = self._connect(queue_num, max_len, sock_len)
        self._sock, self.queue_num, self._callback = sock, queue_num, callback
        self._fd = sock.fileno()
        self._native = NATIVE and isinstance(sock, socket.socket)

    def _netlink(self, queue_num: int, max_len: int, sock_len: int) -> NetlinkSocket:
        """A NETLINK_NETFILTER socket bound to `queue_num` with our flags."""
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, nl.NETLINK_NETFILTER)
        try:
            sock.bind((0, 0))
            if sock_len:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, sock_len)
                except PermissionError:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, sock_len)
            mask = nl.NFQA_CFG_F_FAIL_OPEN | nl.NFQA_CFG_F_GSO | nl.NFQA_CFG_F_CONNTRACK
            seq = self._next_seq()
            self._request(sock, nl.config_command(queue_num, nl.NFQNL_CFG_CMD_BIND, seq), seq)
            seq = self._next_seq()
            self._request(sock, nl.config_queue(queue_num, max_len, self.flags & mask, mask, seq), seq)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    @property
    def counters(self) -> dict[str, int]:
        """ENOBUFS, refused verdicts, receive and verdict system calls."""
        return {"enobufs": self.enobufs, "verdict_errors": self.verdict_errors, "recv_calls": self.recv_calls,
                "verdict_sends": self.verdict_sends}  # fmt: skip

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _request(self, sock: NetlinkSocket, request: bytes, seq: int) -> None:
        """Send one acknowledged request and wait for its answer (an OSError when refused)."""
        sock.send(request)
        sock.settimeout(5.0)
        while True:
            data = sock.recv(RECV_SIZE)
            for item in nl.parse(data):
                if isinstance(item, nl.Ack) and item.seq == seq:
                    if item.errno:
                        raise nl.refused(item.errno, seq)
                    return

    def get_fd(self) -> int:
        """The socket's fd, for the selector."""
        if self._sock is None:
            raise RuntimeError("queue not bound")
        return self._sock.fileno()

    def run(self, block: bool = True) -> None:
        """Handle every packet waiting now, then send their verdicts; exceptions of the callback
        propagate after the verdicts already given have been sent.

        The verdict of the drain's first packet goes as soon as it is given (before the loop's
        work after the packet: its injections the same way, its events): a packet that arrives
        alone, as a short connection's do, waits for nothing. The verdicts after it are held and
        batched (HOLD_MAX, HOLD_SECONDS): in bulk a drain holds many (README: Queue backends).
        The socket is read until it is empty."""
        if block:
            raise ValueError("FastQueue only runs without blocking (the event loop selects)")
        sock, callback = self._sock, self._callback
        if sock is None or callback is None:
            raise RuntimeError("queue not bound")
        native, fd = self._native, self._fd
        self._eager = True
        try:
            while True:
                try:
                    got = _fastio.recv_packet(fd) if native else self._receive(sock)
                except OSError as exc:
                    if exc.errno == errno.ENOBUFS:  # the kernel dropped or bypassed what did not fit
                        self.enobufs += 1
                        continue
                    raise
                if got is None:
                    return
                self.recv_calls += 1
                if isinstance(got, tuple):  # the usual datagram: one packet
                    packet_id, payload, cap_len, skb_info, mark = got
                    packet = FastPacket(self, packet_id, payload, cap_len, skb_info, mark)
                    try:
                        callback(packet)
                    finally:
                        if packet._verdict is None:
                            packet.drop()
                else:  # acknowledgements, errors, several packets: the first packet's verdict still goes at once
                    self._datagram(got, callback)
        finally:
            self._eager = False
            self.flush()

    def _receive(self, sock: NetlinkSocket) -> Received:
        """One datagram read in Python (what _fastio.recv_packet does in C): the usual one through
        nfnetlink.single_packet, its payload copied once from the receive buffer."""
        if not self._buffer:
            self._buffer = bytearray(RECV_SIZE)
            self._view = memoryview(self._buffer)
        try:
            size = sock.recv_into(self._buffer)
        except BlockingIOError:
            return None
        fields = nl.single_packet(self._buffer, size)
        if fields is None:
            return bytes(self._view[:size])
        packet_id, start, end, cap_len, skb_info, mark = fields
        return packet_id, bytes(self._view[start:end]), cap_len, skb_info, mark

    def _datagram(self, data: bytes, callback: Callable[[Any], None]) -> None:
        """Any other datagram: acknowledgements, errors, several packets (parse)."""
        # The kernel sends one packet per datagram; should one hold more, every packet in it
        # still gets its verdict before an exception of the callback propagates.
        error: BaseException | None = None
        for item in nl.parse(data):
            if isinstance(item, nl.Ack):
                if item.errno:
                    self.verdict_errors += 1
                    logger.warning("queue %s refused a verdict: errno %d", self.queue_num, item.errno)
                continue
            packet = FastPacket.of(self, item)
            try:
                callback(packet)
            except BaseException as exc:
                error = error or exc
            finally:
                if packet._verdict is None:
                    packet.drop()
        if error is not None:
            raise error

    def flush(self) -> None:
        """Send the verdicts given so far, in order, in as few sendmsg calls as they fit."""
        pending, self._pending = self._pending, []
        if not pending or self._sock is None or self.queue_num is None:
            return
        queue_num = self.queue_num
        parts: list[bytes] = []
        size = 0
        plain: int | None = None  # the last id of a run of plain accepts not yet sent
        for packet in pending:
            if packet._verdict == nl.NF_ACCEPT and packet._payload is None and packet._mark is None:
                plain = packet.packet_id
                continue
            if plain is not None:
                parts.append(nl.verdict_batch(queue_num, plain, nl.NF_ACCEPT))
                size += 32
                plain = None
            one = self._verdict_parts(packet)
            parts += one
            size += sum(map(len, one))
            if size >= SEND_CHUNK:
                self._send(parts)
                parts, size = [], 0
        if plain is not None:
            parts.append(nl.verdict_batch(queue_num, plain, nl.NF_ACCEPT))
        if parts:
            self._send(parts)

    def _send_one(self, packet: FastPacket) -> None:
        """One packet's verdict now (the drain's first): through _fastio, else `_verdict_parts`."""
        if self._sock is None or self.queue_num is None:
            return
        if self._native:
            assert packet._verdict is not None
            try:
                _fastio.send_verdict(self._fd, self.queue_num, packet.packet_id, packet._verdict, packet._mark,
                                     packet._payload)  # fmt: skip
                self.verdict_sends += 1
                return
            except BlockingIOError:  # sent by _send below, which waits for room
                pass
        self._send(self._verdict_parts(packet))

    def _verdict_parts(self, packet: FastPacket) -> list[bytes]:
        """One packet's verdict message, its new bytes (if any) as a part of their own (not copied)."""
        assert self.queue_num is not None and packet._verdict is not None
        payload = packet._payload
        if payload is None:
            return [nl.verdict(self.queue_num, packet.packet_id, packet._verdict, packet._mark)]
        head = nl.verdict_head(self.queue_num, packet.packet_id, packet._verdict, packet._mark, len(payload))
        return [head, payload, nl.pad(4 + len(payload))]

    def _send(self, parts: list[bytes]) -> None:
        assert self._sock is not None
        self.verdict_sends += 1
        try:
            self._sock.sendmsg(parts)
        except BlockingIOError:  # the kernel handles verdicts as they are sent; wait for room once
            self._sock.settimeout(1.0)
            try:
                self._sock.sendmsg(parts)
            finally:
                self._sock.setblocking(False)

    def unbind(self) -> None:
        """Unbind the queue and close the socket (packets still waiting go to the queue's default)."""
        sock, self._sock = self._sock, None
        self._native, self._fd = False, -1
        if sock is None:
            return
        try:
            if self.queue_num is not None:
                seq = self._next_seq()
                self._request(sock, nl.config_command(self.queue_num, nl.NFQNL_CFG_CMD_UNBIND, seq), seq)
        except OSError:
            logger.debug("unbind of queue %s failed", self.queue_num, exc_info=True)
        finally:
            sock.close()


def factory(fail_open: bool, gso: bool) -> Callable[[], FastQueue]:
    """A queue factory for QueuePair with the given flags."""
    flags = (nl.NFQA_CFG_F_FAIL_OPEN if fail_open else 0) | (nl.NFQA_CFG_F_GSO if gso else 0)
    return lambda: FastQueue(flags)
