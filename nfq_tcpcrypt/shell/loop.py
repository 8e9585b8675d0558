"""The one-thread event loop: queues, control socket, signals and the engine's timer (docs/architecture.md).

An epoll object watches both queue fds, the control socket and a signal wakeup fd (epoll itself,
not `selectors`: its per-wakeup Python is a cost of every lone packet); the wait's timeout is the
engine's next deadline. `time.monotonic()` is read once per wakeup and handed to the engine as
`now` (docs/architecture.md: Layers). At each wakeup, before any packet, the freshness watchers run (a suspend seen on
the clocks, a new-VM-generation uevent): they flush the resumption cache (freshness.py). SIGINT and
SIGTERM only set a flag; the loop then returns and the caller's cleanup runs. Reference cycles are
collected while no packet waits (collector.py).
"""

from __future__ import annotations

import logging
import select
import signal
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import fields
from typing import Any, Final, Protocol

from netfilterqueue import NetfilterQueue

from ..core.events import Event
from ..core.flow import Direction
from ..core.verdict import UNKNOWN, Injection, PacketInfo, Verdict
from .collector import Collector
from .control import ControlServer
from .freshness import Freshness
from .metrics import OBSERVED, EventStats
from .nfq import QueuePair, kernel_queue_stats

logger = logging.getLogger(__name__)

STOP_SIGNALS: Final = (signal.SIGINT, signal.SIGTERM)
_GONE: Final = ("gone", None)
"""What a ready fd no longer watched maps to (a control client finished earlier in the same wakeup)."""
RELOAD_SIGNAL: Final = signal.SIGHUP


class EngineLike(Protocol):
    """The Engine surface the shell uses (core/engine.py)."""

    @property
    def counters(self) -> Mapping[str, int]: ...

    def process(self, packet: bytes, direction: Direction, now: float, encrypted: bool = False,
                info: PacketInfo = UNKNOWN) -> Verdict: ...
    def segments_to_inject(self) -> list[Injection]: ...
    def get_timer(self) -> float | None: ...
    def handle_timer(self, now: float) -> None: ...
    def next_event(self) -> Event | None: ...
    def session_table(self) -> list[dict[str, object]]: ...
    def cache_info(self, now: float) -> list[dict[str, object]]: ...
    def flush_cache(self, reason: str, peer: bytes | None = None) -> int: ...
    def abort_all(self, reason: str, now: float) -> int: ...
    def prepare_wanted(self, now: float) -> bool: ...
    def prepare(self, now: float) -> bool: ...


class InjectorLike(Protocol):
    """The Injector surface the loop uses (inject.py)."""

    sent: int
    sent_local: int
    failed: int

    def send(self, packet: bytes, direction: Direction = Direction.OUTBOUND) -> bool: ...


class SignalWatch:
    """Turns SIGINT/SIGTERM into a flag, SIGHUP into a reload request, plus a readable fd; restores
    the old handlers on close."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.reload = False
        self.reader, self._writer = socket.socketpair()
        self.reader.setblocking(False)
        self._writer.setblocking(False)
        self._old_fd = signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
        self._old = {sig: signal.signal(sig, self._on_signal) for sig in (*STOP_SIGNALS, RELOAD_SIGNAL)}

    def _on_signal(self, signum: int, frame: Any) -> None:
        if signum == RELOAD_SIGNAL:
            self.reload = True
        elif self.received is None:
            self.received = signum

    def take_reload(self) -> bool:
        """Whether a SIGHUP arrived since the last call."""
        reload, self.reload = self.reload, False
        return reload

    def clear(self) -> None:
        """Empty the wakeup fd."""
        try:
            while self.reader.recv(512):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        """Restore the previous handlers and wakeup fd."""
        for sig, old in self._old.items():
            signal.signal(sig, old)
        signal.set_wakeup_fd(self._old_fd)
        self.reader.close()
        self._writer.close()


class EventLoop:
    """Drives one engine from one thread until a stop signal."""

    def __init__(
        self,
        engine: EngineLike,
        queue_num: int,
        injector: InjectorLike,
        signals: SignalWatch,
        freshness: Freshness | None = None,
        queue_factory: Callable[[], Any] = NetfilterQueue,
    ) -> None:
        self.engine = engine
        self.freshness = freshness
        self.injector = injector
        self.signals = signals
        self.counters: dict[str, int] = {}
        self.now = time.monotonic()
        self.control: ControlServer | None = None
        self.on_reload: Callable[[], None] | None = None
        """Called on the loop thread after a SIGHUP (daemon.py: re-read the config)."""
        self.extra_counters: Callable[[], Mapping[str, int]] | None = None
        self.stats = EventStats()
        self.periodic: tuple[float, Callable[[], None]] | None = None
        """(interval, callback): run on the loop thread every `interval` seconds (the metrics file)."""
        self.collector: Collector | None = None
        """Collects reference cycles while no packet waits (collector.py); None: CPython's own collector."""
        self._poller: select.epoll | None = None
        self._handlers: dict[int, tuple[str, Any]] = {}
        self._watch: Callable[..., None] = lambda fd, kind, arg=None: None
        self._later: list[Injection] = []
        """Injections that follow the verdict of the packet being handled (its own direction)."""
        self.queues = QueuePair(queue_num, self._process, self.counters, self._inject, queue_factory,
                                self._inject_first)  # fmt: skip

    def _process(self, packet: bytes, direction: Direction, encrypted: bool, info: PacketInfo) -> Verdict:
        return self.engine.process(packet, direction, self.now, encrypted, info)

    def flush_injections(self) -> None:
        """Send what the engine produced outside a packet callback (at shutdown)."""
        self._flush()

    def _inject_first(self, direction: Direction) -> None:
        """Between a packet's engine step and its verdict: what the step injects the other way goes
        now, what it injects the packet's own way waits for the verdict (`_inject`).

        The two ways are separate paths (toward the wire, toward our stack), so only the order
        within one way matters. On a connection's critical path this sends e.g. B's Init2 before
        the verdict that hands the Init1 segment's ACK to B's stack (whose processing, in the
        verdict's system call, wakes the server), and A's first frame before the verdict on Init2.
        """
        injections = self.engine.segments_to_inject()
        if not injections:
            return
        first = [injection for injection in injections if injection.direction is not direction]
        if len(first) != len(injections):
            self._later += [injection for injection in injections if injection.direction is direction]
        if first:
            self._send(first)

    def _send(self, injections: list[Injection]) -> None:
        """Inject in order, each way after the verdicts its queue holds so far."""
        flushed: Direction | None = None
        for injection in injections:
            if injection.direction is not flushed:
                self.queues.flush_verdicts(injection.direction)
                flushed = injection.direction
            self.injector.send(injection.packet, injection.direction)

    def _inject(self) -> None:
        """Inject what the engine produced, after the verdicts held so far (after each verdict)."""
        injections = self.engine.segments_to_inject()
        if self._later:
            injections, self._later = self._later + injections, []
        if injections:
            self._send(injections)

    def _flush(self) -> None:
        """Inject what the engine produced and log its events (once per wakeup: the events wait in
        the engine until then, at most a drain budget's worth, and no packet's path pays the call)."""
        self._inject()
        while (event := self.engine.next_event()) is not None:
            _log_event(event)
            if isinstance(event, OBSERVED):  # the others would cost an interpreted call for nothing
                self.stats.observe(event)

    def all_counters(self) -> dict[str, int]:
        """Engine counters plus the shell's own (prefixed `shell.`)."""
        out = dict(self.engine.counters)
        out.update({f"shell.{name}": value for name, value in self.counters.items()})
        out["shell.injected"] = self.injector.sent
        out["shell.injected_local"] = self.injector.sent_local
        out["shell.inject_failed"] = self.injector.failed
        out.update({f"shell.queue_{name}": value for name, value in self.queues.backend_counters().items()})
        if self.freshness is not None:
            out.update({f"shell.{name}": value for name, value in self.freshness.counters.items()})
        if self.collector is not None:
            out.update({f"shell.{name}": value for name, value in self.collector.counters.items()})
        num = self.queues.queue_num
        out.update(kernel_queue_stats((num, num + 1)))
        out.update(self.stats.counters)
        out["sessions"] = len(self.engine.session_table())
        if self.extra_counters is not None:
            out.update(self.extra_counters())
        return out

    def run(self) -> int:
        """Serve until SIGINT/SIGTERM; return the signal number that stopped the loop."""
        poller = select.epoll()
        handlers: dict[int, tuple[str, Any]] = {}
        """fd -> (kind, argument), what `_dispatch` does when it is readable."""

        def watch(fd: int, kind: str, arg: Any = None) -> None:
            poller.register(fd, select.EPOLLIN)
            handlers[fd] = (kind, arg)

        collector = self.collector
        if collector is not None:
            collector.start(time.monotonic())
        try:
            for fd, direction in self.queues.fds().items():
                watch(fd, "queue", direction)
            watch(self.signals.reader.fileno(), "signal")
            if self.control is not None:
                watch(self.control.sock.fileno(), "accept")
            if self.freshness is not None and self.freshness.vmgen is not None:
                watch(self.freshness.vmgen.fileno(), "uevent")
            self._watch = watch
            self._poller, self._handlers = poller, handlers
            next_periodic = time.monotonic() if self.periodic is not None else None
            engine, poll, monotonic = self.engine, poller.poll, time.monotonic
            # The engine's next deadline, asked once per wakeup: after the packets, the timers and
            # the work ahead of need, which are what change it.
            timer = engine.get_timer()
            while self.signals.received is None:
                deadline = timer
                if next_periodic is not None:
                    deadline = next_periodic if deadline is None else min(deadline, next_periodic)
                timeout = -1.0 if deadline is None else max(0.0, deadline - monotonic())
                ready = None
                if timeout != 0.0:
                    # The idle point: work ahead of need (ephemeral keys, Engine.prepare), then the
                    # cycle collector (collector.py), one piece at a time, only while no packet waits.
                    wanted = engine.prepare_wanted(self.now)
                    if wanted or (collector is not None and collector.due(self.now)):
                        ready = poll(0)
                        if not ready:
                            if wanted:
                                engine.prepare(self.now)
                                timer = engine.get_timer()
                                self._flush()  # its events, and the resets of a key exchange it failed
                            elif collector is not None:
                                collector.collect(self.now)
                            continue
                if ready is None:
                    ready = poll(timeout)
                self.now = monotonic()
                if self.periodic is not None and next_periodic is not None and self.now >= next_periodic:
                    next_periodic = self.now + self.periodic[0]
                    self.periodic[1]()
                # The cache is flushed before the packets of this wakeup, so no SYN resumes from it.
                if self.freshness is not None:
                    self.freshness.check_clock(self.now)
                if len(ready) > 1:
                    ready.sort(key=lambda item: handlers[item[0]][0] != "uevent")
                for fd, _ in ready:
                    kind, arg = handlers.get(fd, _GONE)
                    if kind == "queue":
                        self.queues.drain(arg)
                    else:
                        self._dispatch(kind, arg)
                timer = engine.get_timer()
                if timer is not None and timer <= self.now:
                    engine.handle_timer(self.now)
                    timer = engine.get_timer()
                self._flush()
        finally:
            poller.close()
            if collector is not None:
                collector.stop()
        return self.signals.received

    def _dispatch(self, kind: str, arg: Any) -> None:
        """Everything but the queues: signals, the VM generation uevent, the control socket."""
        if kind == "signal":
            self.signals.clear()
            if self.signals.take_reload() and self.on_reload is not None:
                self.on_reload()
        elif kind == "uevent" and self.freshness is not None:
            self.freshness.uevent_readable()
        elif kind == "accept" and self.control is not None:
            conn = self.control.accept()
            if conn is not None:
                self._watch(conn.fileno(), "client", conn)
        elif kind == "client" and self.control is not None:
            fd = arg.fileno()
            if self.control.readable(arg):
                if self._poller is not None:
                    self._poller.unregister(fd)
                del self._handlers[fd]
                self.control.finish(arg)

    def close(self) -> None:
        """Unbind the queues."""
        self.queues.close()


def _log_event(event: Event) -> None:
    """One INFO line per lifecycle event (README: Status and metrics); events never carry key material.
    Nothing is formatted when INFO is off (`--log-level WARNING`)."""
    if not logger.isEnabledFor(logging.INFO):
        return
    details = " ".join(f"{f.name}={getattr(event, f.name)}" for f in fields(event) if f.name != "flow")
    logger.info("%s %s %s", event.flow, type(event).__name__, details)
