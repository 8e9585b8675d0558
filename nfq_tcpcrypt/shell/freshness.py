"""Flush the resumption cache when this machine may be a copy of its past self (beyond RFC 8548; README).

A VM that is restored from a snapshot, or cloned, resumes with the very same resumption cache. The
per-direction nonces of RFC 8548 §3.5 already make such sessions use fresh keys as long as either side
draws fresh randomness, but a clone whose peer is also a copy, or whose random state was copied too,
would not. So the daemon forgets every cached secret, before it handles the next packet, when:

- the kernel announces a new VM generation: the vmgenid driver (drivers/virt/vmgenid.c) sends a
  KOBJ_CHANGE uevent with `NEW_VMGENID=1` on NETLINK_KOBJECT_UEVENT (kernel multicast group 1);
  `VmGenWatch` listens and parses each message with pyroute2's uevent marshal;
- the clock shows a suspend: CLOCK_BOOTTIME counts time asleep, CLOCK_MONOTONIC does not, so their
  difference grows by the length of every suspend (and of a VM pause that the guest sees as one).
  `ClockJumpWatch` compares the difference at each loop wakeup with the one before.

Limits (README): a clone that never gets the uevent (no vmgenid device, a hypervisor that does not
update it, a daemon in a non-initial network namespace, where the kernel does not deliver
non-network uevents) is not detected, nor is a peer that was cloned; a uevent that arrives after a
SYN was already queued flushes after that SYN.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from typing import Final

from pyroute2.netlink.uevent import MarshalUevent  # type: ignore[import-untyped]

logger = logging.getLogger(__name__)

NETLINK_KOBJECT_UEVENT = 15
UEVENT_GROUP_KERNEL = 1
CLOCK_JUMP_BOUND = 2.0
"""Seconds by which BOOTTIME - MONOTONIC must grow between two wakeups to count as a suspend."""


def is_new_vmgenid(message: bytes) -> bool:
    """Whether one raw uevent message announces a new VM generation (`NEW_VMGENID=1`)."""
    try:
        for parsed in MarshalUevent().parse(message):
            if parsed.get("NEW_VMGENID") == "1":
                return True
    except (ValueError, IndexError, KeyError):  # a message pyroute2 cannot parse is not ours
        return False
    return False


class VmGenWatch:
    """A non-blocking kernel uevent socket; `poll()` says whether a new VM generation was announced."""

    def __init__(self, sock: socket.socket | None = None) -> None:
        if sock is None:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_KOBJECT_UEVENT)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
                sock.bind((0, UEVENT_GROUP_KERNEL))
            except OSError:
                sock.close()
                raise
        sock.setblocking(False)
        self.sock = sock
        self.messages = 0

    def fileno(self) -> int:
        """The socket's fd, for the selector."""
        return self.sock.fileno()

    def poll(self) -> bool:
        """Read every waiting uevent; True when one of them carries NEW_VMGENID=1."""
        found = False
        while True:
            try:
                data = self.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return found
            except OSError as exc:  # ENOBUFS: uevents were lost; assume the worst
                logger.warning("uevent socket: %s; flushing the resumption cache to be safe", exc)
                return True
            if not data:
                return found
            self.messages += 1
            if is_new_vmgenid(data):
                found = True

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()


_CLOCK_BOOTTIME: Final = time.CLOCK_BOOTTIME
_CLOCK_MONOTONIC: Final = time.CLOCK_MONOTONIC


def _boottime() -> float:
    return time.clock_gettime(_CLOCK_BOOTTIME)


def _monotonic() -> float:
    return time.clock_gettime(_CLOCK_MONOTONIC)


class ClockJumpWatch:
    """Detects a suspend/resume: CLOCK_BOOTTIME - CLOCK_MONOTONIC grew by more than `bound` seconds."""

    def __init__(
        self,
        bound: float = CLOCK_JUMP_BOUND,
        boottime: Callable[[], float] = _boottime,
        monotonic: Callable[[], float] = _monotonic,
    ) -> None:
        self.bound = bound
        self._boottime = boottime
        self._monotonic = monotonic
        self._system = boottime is _boottime and monotonic is _monotonic
        """The system's clocks (not a test's): read directly, and the caller's monotonic reading used."""
        self._last = self._gap()

    def _gap(self) -> float:
        return self._boottime() - self._monotonic()

    def check(self, monotonic: float | None = None) -> float | None:
        """The time slept since the last check when it exceeds the bound, else None. `monotonic`:
        CLOCK_MONOTONIC read just before (the loop's `now`), saving a read at every wakeup; a delay
        between the two readings only adds to the gap (at worst a flush, never a missed one)."""
        if self._system:
            if monotonic is None:
                monotonic = time.clock_gettime(_CLOCK_MONOTONIC)
            gap = time.clock_gettime(_CLOCK_BOOTTIME) - monotonic
        else:
            gap = self._gap()
        slept, self._last = gap - self._last, gap
        return slept if slept > self.bound else None


class Freshness:
    """Both detectors; calls `flush(reason)` when either fires."""

    def __init__(
        self,
        flush: Callable[[str], object],
        clock: ClockJumpWatch | None = None,
        vmgen: VmGenWatch | None = None,
    ) -> None:
        self.flush = flush
        self.clock = clock
        self.vmgen = vmgen
        self.counters: dict[str, int] = {"cache_flush_vmgenid": 0, "cache_flush_suspend": 0}

    @classmethod
    def system(cls, flush: Callable[[str], object]) -> Freshness:
        """Both detectors on this machine; the uevent one only when its socket can be opened."""
        vmgen = None
        try:
            vmgen = VmGenWatch()
        except OSError as exc:
            logger.warning("cannot listen for VM generation uevents (%s): that flush is disabled", exc)
        return cls(flush, ClockJumpWatch(), vmgen)

    def check_clock(self, monotonic: float | None = None) -> None:
        """At each loop wakeup, before any packet: flush after a suspend (`monotonic`: the loop's
        `now`, read from CLOCK_MONOTONIC just before)."""
        if self.clock is None:
            return
        slept = self.clock.check(monotonic)
        if slept is not None:
            self.counters["cache_flush_suspend"] += 1
            self.flush(f"suspend/resume: boot-time clock jumped {slept:.1f}s past the monotonic clock")

    def uevent_readable(self) -> None:
        """The uevent socket is readable: flush on a new VM generation."""
        if self.vmgen is not None and self.vmgen.poll():
            self.counters["cache_flush_vmgenid"] += 1
            self.flush("new VM generation (NEW_VMGENID uevent)")

    def close(self) -> None:
        """Close the uevent socket."""
        if self.vmgen is not None:
            self.vmgen.close()
