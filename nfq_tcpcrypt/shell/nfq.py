"""NFQUEUE binding: one queue per direction, verdicts on the loop thread (docs/architecture.md).

Queue N carries INBOUND packets (wire -> local, decrypt), queue N+1 OUTBOUND (local -> wire, encrypt).
Every packet gets exactly one verdict, inside try/finally. A packet whose copy is shorter than its IP
total length (the 4016-byte copy cap) is accepted unchanged and counted: rewriting it would cut it.

Two bindings have this surface (README: Queue backends): NetfilterQueue, and our own netlink
binding (fastqueue.py), which batches and exposes the kernel's metadata of each packet
(`QueuePair.info`: GSO super-packet, checksum not ready).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Final

from netfilterqueue import NetfilterQueue

from ..core.flow import Direction
from ..core.verdict import ACCEPT, UNKNOWN, Action, PacketInfo, Verdict
from . import nfnetlink as nl
from .fastqueue import FastPacket, factory
from .rules import ENCRYPTED_MARK

logger = logging.getLogger(__name__)

SOCK_LEN: Final = 4 * 1024 * 1024
"""Receive buffer of each queue's netlink socket, passed explicitly (docs/architecture.md: `sock_len`)."""

MAX_LEN: Final = 4096
"""Packets the kernel keeps waiting per queue before it drops (or bypasses, with --queue-bypass)."""

DRAIN_BUDGET: Final = 128
"""Packets handled per `drain()` before control returns to the loop (timers, control socket, `now`)."""

Handler = Callable[[bytes, Direction, bool, PacketInfo], Verdict]

_INFOS = {(gso, trusted): PacketInfo(gso, trusted) for gso in (False, True) for trusted in (False, True)}


def packet_info(skb_info: int) -> PacketInfo:
    """The engine's view of a fast-backend packet's NFQA_SKB_* flags: a GSO super-packet, and a
    checksum the kernel vouches for (not ready: made here or forwarded, the kernel fills it in;
    neither flag: verified, on our inbound hook, or completed before the copy)."""
    info = _BY_SKB_INFO.get(skb_info)
    if info is None:
        trusted = bool(skb_info & nl.NFQA_SKB_CSUMNOTREADY) or not skb_info & nl.NFQA_SKB_CSUM_NOTVERIFIED
        info = _INFOS[bool(skb_info & nl.NFQA_SKB_GSO), trusted]
    return info


_BY_SKB_INFO: dict[int, PacketInfo] = {}
_BY_SKB_INFO.update((flags, packet_info(flags)) for flags in range(8))
"""packet_info of the three flags' combinations, looked up instead of worked out per packet."""

BACKENDS = ("netfilterqueue", "fast")


def queue_factory(backend: str, fail_open: bool = False, gso: bool = False) -> Callable[[], Any]:
    """The binding for `backend`; the fast one is bound with NFQA_CFG_F_FAIL_OPEN when `fail_open`
    (a full queue accepts instead of dropping) and NFQA_CFG_F_GSO when `gso`."""
    if backend == "netfilterqueue":
        if gso or fail_open:
            raise ValueError("NetfilterQueue cannot set queue flags (GSO, fail-open)")
        return NetfilterQueue
    if backend == "fast":
        return factory(fail_open, gso)
    raise ValueError(f"unknown queue backend {backend!r}")


class _BudgetSpent(Exception):
    """Raised from the callback, after the verdict, to leave `NetfilterQueue.run()` early.

    Callback exceptions propagate out of `run()` (NetfilterQueue >= 1.0); each netlink datagram holds
    one packet, so no other packet is left without a verdict.
    """


def ip_total_length(packet: bytes) -> int:
    """The length the IP header claims for the whole packet (v4 total length, v6 40 + payload length)."""
    version = packet[0] >> 4
    # Byte by byte where the field is whole: plain loads when compiled (no slice, no int.from_bytes).
    if version == 4:
        return packet[2] << 8 | packet[3] if len(packet) >= 4 else int.from_bytes(packet[2:4], "big")
    if version == 6:
        return 40 + (packet[4] << 8 | packet[5] if len(packet) >= 6 else int.from_bytes(packet[4:6], "big"))
    return -1


class QueuePair:
    """The two bound queues and the per-packet glue between NetfilterQueue and a handler."""

    def __init__(
        self,
        queue_num: int,
        handler: Handler,
        counters: dict[str, int],
        after: Callable[[], None] = lambda: None,
        queue_factory: Callable[[], Any] = NetfilterQueue,
        before: Callable[[Direction], None] | None = None,
    ) -> None:
        """Bind queues `queue_num` (inbound) and `queue_num + 1` (outbound); `after` runs after each
        verdict, `before` (with the packet's direction) between the handler and the verdict;
        `queue_factory` makes the binding (NetfilterQueue; a fake in the unit tests)."""
        self.queue_num = queue_num
        self._handler = handler
        self._after = after
        self._before = before
        self._handled = 0
        self._counters = counters
        self.info: Any = None
        """The kernel's metadata of the packet being handled (fast backend: the FastPacket, with its
        `skb_info`, `gso` and `csum_not_ready`); None on NetfilterQueue."""
        self.queues: dict[Direction, Any] = {}
        self._inbound: Any = None
        self._outbound: Any = None
        """The two queues as attributes too: `drain` picks one without hashing the enum (a Python
        call, Enum.__hash__, even when this module is compiled)."""
        try:
            for offset, direction in ((0, Direction.INBOUND), (1, Direction.OUTBOUND)):
                queue = queue_factory()
                queue.bind(
                    queue_num + offset,
                    self._callback(direction),
                    max_len=MAX_LEN,
                    sock_len=SOCK_LEN,
                )
                self.queues[direction] = queue
            self._inbound, self._outbound = self.queues[Direction.INBOUND], self.queues[Direction.OUTBOUND]
        except BaseException:
            self.close()
            raise

    def _count(self, name: str) -> None:
        self._counters[name] = self._counters.get(name, 0) + 1

    def _callback(self, direction: Direction) -> Callable[[Any], None]:
        counters, packets, handler = self._counters, "packets_" + direction.value, self._handler
        counters.setdefault(packets, 0)

        def on_packet(pkt: Any) -> None:
            verdict: Verdict | None = None
            try:
                info = UNKNOWN
                if isinstance(pkt, FastPacket):  # the fast backend's, with the kernel's metadata
                    payload, length, mark, skb_info = pkt.payload, pkt.cap_len, pkt.mark, pkt.skb_info
                    self.info = pkt
                    if skb_info:
                        if skb_info & nl.NFQA_SKB_GSO:
                            self._count("gso_packets")
                        if skb_info & nl.NFQA_SKB_CSUMNOTREADY:
                            self._count("csum_not_ready")
                    info = _BY_SKB_INFO.get(skb_info) or packet_info(skb_info)
                else:
                    payload, length, mark = pkt.get_payload(), pkt.get_payload_len(), pkt.get_mark()
                    self.info = None
                counters[packets] += 1
                if length != ip_total_length(payload):
                    self._count("truncated_accepted")
                    logger.warning(
                        "queued copy is %d bytes, ip length says %d: accepted unchanged",
                        length, ip_total_length(payload),
                    )  # fmt: skip
                    verdict = ACCEPT
                else:
                    verdict = handler(payload, direction, bool(mark & ENCRYPTED_MARK), info)
                    if self._before is not None:
                        self._before(direction)
            except Exception:
                self._count("handler_errors")
                logger.exception("engine failed on a %s packet; dropping it", direction.value)
                verdict = None
            finally:
                _apply(pkt, verdict)
            self._after()
            self._handled += 1
            if self._handled >= DRAIN_BUDGET:
                raise _BudgetSpent

        return on_packet

    def fds(self) -> dict[int, Direction]:
        """File descriptor -> direction, for the selector."""
        return {queue.get_fd(): direction for direction, queue in self.queues.items()}

    def drain(self, direction: Direction) -> None:
        """Handle the packets waiting on `direction`'s queue, at most DRAIN_BUDGET, without blocking."""
        self._handled = 0
        try:
            (self._inbound if direction is Direction.INBOUND else self._outbound).run(block=False)
        except _BudgetSpent:
            self._count("drain_budget_spent")

    def flush_verdicts(self, direction: Direction | None = None) -> None:
        """Send the verdicts a batching backend still holds on `direction`'s queue (None: both),
        before packets are injected that way, so each way keeps the order the engine produced."""
        for queue_direction, queue in self.queues.items():
            if direction is not None and queue_direction is not direction:
                continue
            flush = getattr(queue, "flush", None)
            if flush is not None:
                flush()

    def backend_counters(self) -> dict[str, int]:
        """The binding's own counters over both queues (fast backend: ENOBUFS, refused verdicts,
        receive and verdict system calls)."""
        out: dict[str, int] = {}
        for queue in self.queues.values():
            for name, value in getattr(queue, "counters", {}).items():
                out[name] = out.get(name, 0) + value
        return out

    def close(self) -> None:
        """Unbind both queues."""
        for queue in self.queues.values():
            try:
                queue.unbind()
            except Exception:  # already unbound or never fully bound
                logger.debug("unbind failed", exc_info=True)
        self.queues = {}
        self._inbound = self._outbound = None


def kernel_queue_stats(queue_nums: tuple[int, ...]) -> dict[str, int]:
    """Kernel-side counters of our queues from /proc/net/netfilter/nfnetlink_queue (docs/architecture.md).

    Per queue: packets waiting for a verdict, dropped because the queue was full, dropped because
    netlink could not deliver them to us.
    """
    out: dict[str, int] = {}
    try:
        with open("/proc/net/netfilter/nfnetlink_queue") as stats:
            for line in stats:
                fields = line.split()
                if len(fields) >= 7 and int(fields[0]) in queue_nums:
                    queue = fields[0]
                    out[f"kernel.queue{queue}.waiting"] = int(fields[2])
                    out[f"kernel.queue{queue}.queue_dropped"] = int(fields[5])
                    out[f"kernel.queue{queue}.user_dropped"] = int(fields[6])
    except (OSError, ValueError):
        pass
    return out


def _apply(pkt: Any, verdict: Verdict | None) -> None:
    """Issue `verdict` on `pkt` (DROP when the handler produced none)."""
    if verdict is ACCEPT:  # the usual verdict of a packet passed unchanged
        if isinstance(pkt, FastPacket):
            pkt.accept()  # a native call when compiled
        else:
            pkt.accept()
        return
    if verdict is None or verdict.action is Action.DROP:
        pkt.drop()
        return
    if verdict.encrypted:
        # The rules mark an encrypted connection's outbound packets before they are queued: those
        # keep their mark, and their verdict carries none (one attribute less for the kernel).
        mark = pkt.mark if isinstance(pkt, FastPacket) else pkt.get_mark()
        if not mark & ENCRYPTED_MARK:
            pkt.set_mark(mark | ENCRYPTED_MARK)
    if verdict.packet is not None:
        try:
            pkt.set_payload(bytes(verdict.packet))
        except Exception:
            logger.exception("set_payload failed; dropping the packet")
            pkt.drop()
            return
    pkt.accept()
