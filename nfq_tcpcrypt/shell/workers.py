"""Several workers (`run --workers N`): one process per queue pair under one supervisor (README: Workers).

The supervisor forks N workers before anything else. Worker k binds the queues `queue_num + 2k`
(inbound) and `+ 1` (outbound), runs its own engine, injector and loop (loop.py), and answers on a
private control socket `CONTROL.wK` (mode 0600, like the main one). Once every worker is bound the
supervisor installs the rules, whose NFQUEUE targets pick the worker by a symmetric hash of the
4-tuple (dispatch.py), so both directions of a connection reach the same worker; then it opens the
control socket and answers for all workers: `sessions` is every worker's table (each entry with its
`worker`), `counters` their sums plus the supervisor's own, `cache` and `cache_flush` its cache.

Resumption across workers (RFC 8548 §3.5): the supervisor owns the one resumption cache. A worker's
engine gets a `RemoteCache` in place of its own, which asks the supervisor over a private
socketpair: `store` when a session is keyed, and `offer` / `answer` (take a secret, burned in the
same step) on a SYN or SYN-ACK, so a secret cached by one worker resumes a connection on another
and still secures at most one connection. The secrets cross only that socketpair, in memory; they
are never logged. A worker that gets no answer within `CACHE_TIMEOUT` goes on without resumption
(a fresh key exchange). The cache flushes on a new VM generation or a suspend run in the supervisor.

On SIGINT/SIGTERM the supervisor has every worker reset its encrypted connections toward both ends
(README: Security model), removes the rules, then stops the workers (SIGTERM, then SIGKILL after
`STOP_TIMEOUT`). A worker that dies stops the whole daemon with status 1 (its flows
could not be served), so `Restart=on-failure` starts it again; since a dead worker (or one that does
not answer) cannot reset its encrypted connections, the rules then stay in place and those
connections fail closed, as a killed daemon's do, until the next start takes the rules over. A
supervisor that dies (even by SIGKILL) takes its workers with it (PR_SET_PDEATHSIG), so
`rules remove` leaves nothing running.
SIGHUP is passed on to every worker.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import select
import selectors
import signal
import socket
import time
from collections import Counter
from typing import Any

from ..core.constants import Aead, Role, Tep
from ..core.engine import Engine
from ..core.errors import ConfigError
from ..core.kex import KeyPool
from ..core.resumption import Resumable, ResumptionCache
from . import metrics, rules, settings
from .collector import Collector
from .control import CommandError, ControlServer
from .daemon import _peer, control_commands, install_rules, make_reload, metrics_writer, pin, queue_binding
from .freshness import Freshness
from .inject import Injector
from .keylog import KeyLog
from .loop import EngineLike, EventLoop, SignalWatch
from .passthrough import PassThroughEngine
from .settings import DaemonOptions

logger = logging.getLogger(__name__)

CACHE_TIMEOUT = 1.0
"""Seconds a worker waits for the supervisor's cache answer before it goes on without resumption."""
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0
QUERY_TIMEOUT = 5.0
MAX_MESSAGE = 65536
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


# --- worker side ----------------------------------------------------------------------------------


class RemoteCache:
    """The resumption cache as seen by a worker: every operation is the supervisor's (module doc)."""

    def __init__(self, sock: socket.socket, timeout: float = CACHE_TIMEOUT) -> None:
        self.sock = sock
        self.timeout = timeout
        self.failures = 0
        self._id = 0

    def _send(self, message: dict[str, Any]) -> None:
        self.sock.send(json.dumps(message).encode())

    def _request(self, message: dict[str, Any]) -> dict[str, Any] | None:
        self._id += 1
        message["id"] = self._id
        try:
            self._send(message)
            deadline = time.monotonic() + self.timeout
            while (left := deadline - time.monotonic()) > 0:
                ready, _, _ = select.select([self.sock], [], [], left)
                if not ready:
                    break
                reply: dict[str, Any] = json.loads(self.sock.recv(MAX_MESSAGE))
                if reply.get("id") == self._id:  # a late answer to an earlier request is dropped
                    return reply
        except (OSError, ValueError) as exc:
            logger.warning("resumption cache request failed: %s", exc)
        self.failures += 1
        return None

    def store(self, peer: bytes, ss0: bytes, tep: Tep, aead: Aead, role: Role, now: float) -> None:
        """Hand a fresh session's secret to the supervisor's cache (no answer awaited)."""
        message = {"op": "store", "peer": peer.hex(), "ss0": ss0.hex(), "tep": int(tep), "aead": int(aead),
                   "role": role.value, "now": now}  # fmt: skip
        try:
            self._send(message)
        except OSError as exc:
            self.failures += 1
            logger.warning("resumption cache store failed: %s", exc)

    def take_for_offer(self, peer: bytes, teps: tuple[Tep, ...], now: float) -> Resumable | None:
        """ResumptionCache.take_for_offer, done by the supervisor."""
        reply = self._request({"op": "offer", "peer": peer.hex(), "teps": [int(t) for t in teps], "now": now})
        return _resumable(reply)

    def take_for_answer(self, peer: bytes, tep: int, half: bytes, now: float) -> Resumable | None:
        """ResumptionCache.take_for_answer, done by the supervisor."""
        reply = self._request({"op": "answer", "peer": peer.hex(), "tep": tep, "half": half.hex(), "now": now})
        return _resumable(reply)

    def flush(self, peer: bytes | None = None) -> int:
        """Flush the supervisor's cache (all, or one peer's)."""
        reply = self._request({"op": "flush", "peer": peer.hex() if peer else None})
        return int(reply.get("flushed", 0)) if reply else 0

    def info(self, now: float) -> list[dict[str, object]]:
        """The supervisor's cache listing (never secrets)."""
        reply = self._request({"op": "info", "now": now})
        return list(reply.get("info", [])) if reply else []

    def __len__(self) -> int:
        return len(self.info(time.monotonic()))


def _resumable(reply: dict[str, Any] | None) -> Resumable | None:
    if not reply or not reply.get("resumable"):
        return None
    r = reply["resumable"]
    return Resumable(bytes.fromhex(r["ss"]), bytes.fromhex(r["resume_id"]), Tep(r["tep"]), Aead(r["aead"]),
                     Role(r["original_role"]))  # fmt: skip


def worker_control_path(control: str, index: int) -> str:
    """The private control socket of worker `index`."""
    return f"{control}.w{index}"


def _worker_main(options: DaemonOptions, index: int, sock: socket.socket) -> int:
    """Body of worker `index` (a forked child): serve its queue pair until SIGTERM."""
    for handler in logging.getLogger().handlers:
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s w{index} %(name)s: %(message)s"))
    if options.cpus:
        pin({options.cpus[index % len(options.cpus)]})
    with contextlib.ExitStack() as stack:
        signals = SignalWatch()
        stack.callback(signals.close)
        # Ctrl-C reaches the whole process group: only the supervisor acts on it, removing the rules
        # before it stops the workers (no packet waits on a queue nobody reads).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        keylog = None
        if options.keylog:
            keylog = KeyLog(options.keylog)
            stack.callback(keylog.close)
        engine: EngineLike
        remote = RemoteCache(sock)
        if options.pass_through:
            engine = PassThroughEngine()
        else:
            real = Engine(options.configuration(keylog.write if keylog else None))
            real.cache = remote  # a core.resumption.SecretCache (module docstring)
            # The cache flush triggers (a new VM generation, a suspend) run in the supervisor, which
            # cannot empty a worker's pool of keys made ahead (KeyPool): workers make theirs on the spot.
            real.keys = KeyPool(size=0)
            engine = real
        injector = Injector(options.mark, options.local_mark)
        stack.callback(injector.close)
        loop = EventLoop(engine, options.queue_num + 2 * index, injector, signals, None, queue_binding(options))
        stack.callback(loop.close)
        loop.extra_counters = lambda: {"shell.cache_remote_failed": remote.failures}
        loop.on_reload = make_reload(options, engine, keylog.write if keylog else None, loop.counters)
        control = ControlServer(worker_control_path(options.control, index), control_commands(engine, loop))
        stack.callback(control.close)
        loop.control = control
        sock.send(json.dumps({"op": "ready", "worker": index}).encode())
        loop.collector = Collector()  # as run_daemon's
        loop.run()
    return 0


def _die_with_parent(parent: int) -> None:
    """SIGTERM this worker when the supervisor dies, even by SIGKILL (prctl(2) PR_SET_PDEATHSIG)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # the supervisor died before the prctl
        os.kill(os.getpid(), signal.SIGTERM)


# --- supervisor side ------------------------------------------------------------------------------


def serve_cache(cache: ResumptionCache, message: dict[str, Any]) -> dict[str, Any] | None:
    """The supervisor's answer to one worker cache message (None for `store`, which gets none)."""
    op = message.get("op")
    if op == "store":
        cache.store(bytes.fromhex(message["peer"]), bytes.fromhex(message["ss0"]), Tep(message["tep"]),
                    Aead(message["aead"]), Role(message["role"]), float(message["now"]))  # fmt: skip
        return None
    reply: dict[str, Any] = {"id": message.get("id")}
    found: Resumable | None = None
    if op == "offer":
        teps = tuple(Tep(t) for t in message["teps"])
        found = cache.take_for_offer(bytes.fromhex(message["peer"]), teps, float(message["now"]))
    elif op == "answer":
        peer, half = bytes.fromhex(message["peer"]), bytes.fromhex(message["half"])
        found = cache.take_for_answer(peer, int(message["tep"]), half, float(message["now"]))
    elif op == "flush":
        peer_hex = message.get("peer")
        reply["flushed"] = cache.flush(bytes.fromhex(peer_hex) if peer_hex else None)
    elif op == "info":
        reply["info"] = cache.info(float(message.get("now", time.monotonic())))  # the asker's clock
    else:
        reply["error"] = f"unknown op {op!r}"
    if found is not None:
        reply["resumable"] = {"ss": found.ss.hex(), "resume_id": found.resume_id.hex(), "tep": int(found.tep),
                              "aead": int(found.aead), "original_role": str(found.original_role)}  # fmt: skip
    return reply


class Supervisor:
    """The parent process: workers, rules, the control socket, the shared cache (module doc)."""

    def __init__(self, options: DaemonOptions, workers: int) -> None:
        self.options = options
        self.count = workers
        config = options.configuration()
        self.cache = ResumptionCache(config.resume_cache_size, config.resume_ttl)
        self.pids: dict[int, int] = {}
        self.socks: dict[int, socket.socket] = {}
        self.ready: set[int] = set()
        self.dead: dict[int, int] = {}
        self.counters: Counter[str] = Counter()
        self.freshness: Freshness | None = None
        self.installed: rules.InstalledRules | None = None
        self._counters_command: Any = dict

    # workers
    def spawn(self) -> None:
        """Fork the workers (before any thread, selector or rule exists)."""
        for index in range(self.count):
            parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            pid = os.fork()
            if pid == 0:  # the worker
                code = 1
                try:
                    _die_with_parent(os.getppid())
                    parent_end.close()
                    for other in self.socks.values():
                        other.close()
                    code = _worker_main(self.options, index, child_end)
                except BaseException:
                    logger.exception("worker %d failed", index)
                finally:
                    logging.shutdown()
                    os._exit(code)
            child_end.close()
            self.pids[index] = pid
            self.socks[index] = parent_end

    def _serve(self, index: int) -> bool:
        """Handle one message from worker `index`; False when it is gone."""
        try:
            data = self.socks[index].recv(MAX_MESSAGE)
        except OSError:
            data = b""
        if not data:
            return False
        message = json.loads(data)
        if message.get("op") == "ready":
            self.ready.add(index)
            return True
        reply = serve_cache(self.cache, message)
        self.counters[f"supervisor.cache_{message.get('op')}"] += 1
        if reply is not None:
            with contextlib.suppress(OSError):
                self.socks[index].send(json.dumps(reply).encode())
        return True

    def _pump(self, timeout: float) -> None:
        """Serve worker messages for up to `timeout` seconds (returns after the first batch)."""
        ready, _, _ = select.select(list(self.socks.values()), [], [], timeout)
        by_sock = {sock: index for index, sock in self.socks.items()}
        for sock in ready:
            index = by_sock[sock]
            if not self._serve(index):
                self._mark_dead(index)

    def _mark_dead(self, index: int) -> None:
        sock = self.socks.pop(index, None)
        if sock is not None:
            sock.close()
        pid = self.pids.get(index)
        code = -1
        if pid is not None:
            with contextlib.suppress(ChildProcessError):
                done, status = os.waitpid(pid, 0)
                code = os.waitstatus_to_exitcode(status)
            self.pids.pop(index, None)
        self.dead[index] = code

    def wait_ready(self) -> None:
        """Until every worker has bound its queues; RuntimeError when one died or it takes too long."""
        deadline = time.monotonic() + READY_TIMEOUT
        while len(self.ready) < self.count:
            if self.dead:
                raise RuntimeError(f"worker(s) {sorted(self.dead)} exited during start-up ({self.dead})")
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"workers {sorted(set(range(self.count)) - self.ready)} not ready in time")
            self._pump(min(left, 0.5))

    def stop(self) -> int:
        """SIGTERM every live worker, bounded wait, SIGKILL; 0 when all exited 0."""
        for pid in self.pids.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        status = 0
        for index, pid in list(self.pids.items()):
            code = None
            while code is None:
                done, raw = os.waitpid(pid, os.WNOHANG)
                if done:
                    code = os.waitstatus_to_exitcode(raw)
                elif time.monotonic() > deadline:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    code = -9
                else:
                    time.sleep(0.05)
            if code != 0:
                logger.error("worker %d exited with %s", index, code)
                status = 1
            self.pids.pop(index)
        for sock in self.socks.values():
            sock.close()
        self.socks.clear()
        return status

    def signal_workers(self, signum: int) -> None:
        """Pass a signal (SIGHUP) on to every worker."""
        for pid in self.pids.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    # control
    def ask(self, index: int, cmd: str) -> Any:
        """`cmd` on worker `index`'s private control socket, serving cache requests while waiting."""
        try:
            return self._ask(index, cmd)
        except (OSError, ValueError) as exc:
            raise CommandError(f"worker {index} did not answer {cmd!r}: {exc}") from None

    def _ask(self, index: int, cmd: str) -> Any:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(QUERY_TIMEOUT)
            conn.connect(worker_control_path(self.options.control, index))
            conn.sendall(json.dumps({"cmd": cmd}).encode() + b"\n")
            conn.setblocking(False)
            chunks: list[bytes] = []
            deadline = time.monotonic() + QUERY_TIMEOUT
            while time.monotonic() < deadline:
                ready, _, _ = select.select([conn, *self.socks.values()], [], [], deadline - time.monotonic())
                if conn in ready:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return json.loads(b"".join(chunks).decode())
                    chunks.append(chunk)
                by_sock = {sock: k for k, sock in self.socks.items()}
                for sock in ready:
                    if sock in by_sock and not self._serve(by_sock[sock]):
                        self._mark_dead(by_sock[sock])
        raise CommandError(f"worker {index} did not answer {cmd!r} in {QUERY_TIMEOUT}s")

    def commands(self) -> dict[str, Any]:
        """The control socket's commands, answered for all workers (README: Workers)."""

        def sessions(request: dict[str, Any]) -> list[dict[str, Any]]:
            table = []
            for index in sorted(self.socks):
                table += [{**entry, "worker": index} for entry in self.ask(index, "sessions")]
            return table

        self._counters_command = lambda: counters({})

        def counters(request: dict[str, Any]) -> dict[str, int]:
            total: Counter[str] = Counter()
            for index in sorted(self.socks):
                total.update(self.ask(index, "counters"))
            total.update(self.counters)
            if self.freshness is not None:
                total.update({f"shell.{name}": value for name, value in self.freshness.counters.items()})
            total["shell.workers"] = self.count
            total["cache_entries"] = len(self.cache)
            return dict(total)

        def flush(request: dict[str, Any]) -> dict[str, int]:
            peer = _peer(request)
            count = self.cache.flush(peer)
            self.counters["cache_flushes"] += 1
            logger.info("resumption cache flushed (operator request): %d entries", count)
            return {"flushed": count}

        def status(request: dict[str, Any]) -> dict[str, Any]:
            return self.status()

        return {
            "sessions": sessions,
            "counters": counters,
            "status": status,
            "metrics": lambda request: {"text": metrics.prometheus(self.status())},
            "ping": lambda request: {"ok": True, "pid": os.getpid(), "workers": self.count},
            "cache": lambda request: self.cache.info(time.monotonic()),
            "cache_flush": flush,
        }

    def status(self) -> dict[str, Any]:
        """The `status` document for all workers."""
        options = self.options
        meta = {"mode": options.mode, "workers": self.count, "pid": os.getpid(),
                "queues": list(range(options.queue_num, options.queue_num + 2 * self.count)),
                "rules": self.installed.lines() if self.installed is not None else [],
                "queue_backend": options.queue_backend, "queue_gso": settings.gso_enabled(options)}  # fmt: skip
        return metrics.status(self._counters_command(), meta)

    def reload_cache_settings(self) -> None:
        """On SIGHUP: the shared cache takes the new resume-ttl and resume-cache-size (the workers
        reload the rest themselves); a bad file changes nothing here either."""
        try:
            self.options = settings.reload_options(self.options)
            config = self.options.configuration()
        except (ConfigError, OSError) as exc:
            logger.error("reload failed, the running cache settings stay: %s", exc)
            return
        self.cache.ttl, self.cache.max_entries = config.resume_ttl, config.resume_cache_size

    def _flush_fresh(self, reason: str) -> None:
        count = self.cache.flush()
        logger.info("resumption cache flushed (%s): %d entries", reason, count)

    def run(self, signals: SignalWatch, control: ControlServer) -> int | None:
        """Serve the control socket and the workers' cache requests until a stop signal or a death."""
        self.freshness = Freshness.system(self._flush_fresh)
        selector = selectors.DefaultSelector()
        try:
            selector.register(signals.reader, selectors.EVENT_READ, ("signal", None))
            selector.register(control.sock, selectors.EVENT_READ, ("accept", None))
            for index, sock in self.socks.items():
                selector.register(sock, selectors.EVENT_READ, ("worker", index))
            if self.freshness.vmgen is not None:
                selector.register(self.freshness.vmgen.fileno(), selectors.EVENT_READ, ("uevent", None))
            write_metrics = None
            if self.options.metrics_file:
                write_metrics = metrics_writer(self.options.metrics_file, self.status)
            next_metrics = time.monotonic()
            while signals.received is None and not self.dead:
                ready = selector.select(1.0)
                self.freshness.check_clock()
                if write_metrics is not None and time.monotonic() >= next_metrics:
                    next_metrics = time.monotonic() + metrics.METRICS_INTERVAL
                    write_metrics()
                for key, _ in ready:
                    kind, arg = key.data
                    if kind == "signal":
                        signals.clear()
                        if signals.take_reload():
                            self.reload_cache_settings()
                            self.signal_workers(signal.SIGHUP)
                    elif kind == "uevent":
                        self.freshness.uevent_readable()
                    elif kind == "accept":
                        conn = control.accept()
                        if conn is not None:
                            selector.register(conn, selectors.EVENT_READ, ("client", conn))
                    elif kind == "client" and control.readable(arg):
                        selector.unregister(arg)
                        control.finish(arg)
                    elif kind == "worker" and arg in self.socks and not self._serve(arg):
                        selector.unregister(self.socks[arg])
                        self._mark_dead(arg)
                for index in list(self.dead):
                    logger.error("worker %d exited (%s): stopping", index, self.dead[index])
        finally:
            selector.close()
            self.freshness.close()
        return signals.received


def run_workers(options: DaemonOptions, workers: int) -> int:
    """The daemon with `workers` processes; return the exit status (0 when all was cleaned up)."""
    supervisor = Supervisor(options, workers)
    if options.keylog:
        KeyLog(options.keylog).close()  # created (0600, with its header) once, before the workers append
    supervisor.spawn()
    status = 0
    with contextlib.ExitStack() as stack:
        stack.callback(lambda: None)
        signals = SignalWatch()
        stack.callback(signals.close)

        def stop_workers() -> None:
            nonlocal status
            if supervisor.stop():
                status = 1

        stack.callback(stop_workers)
        supervisor.wait_ready()
        logger.info("%d workers bound queues %d..%d", workers, options.queue_num, options.queue_num + 2 * workers - 1)
        installed = install_rules(options, workers)
        supervisor.installed = installed

        unreset: list[int] = []

        def remove_rules() -> None:
            nonlocal status
            if unreset:
                problems = installed.keep(f"worker(s) {', '.join(map(str, unreset))} did not reset theirs")
            else:
                problems = installed.remove()
            if problems:
                status = 1

        stack.callback(remove_rules)

        def abort_encrypted() -> None:
            # Before the rules go, every worker resets its encrypted connections (README: Security
            # model). A worker that died or does not answer cannot: the rules stay, and its
            # connections fail closed as a killed daemon's do.
            unreset.extend(sorted(supervisor.dead))
            for index in sorted(supervisor.pids):
                try:
                    supervisor.ask(index, "abort_all")
                except CommandError as exc:
                    logger.warning("%s", exc)
                    unreset.append(index)

        stack.callback(abort_encrypted)
        commands = supervisor.commands()
        control = ControlServer(options.control, commands)
        stack.callback(control.close)
        logger.info("control socket %s ready", options.control)
        signum = supervisor.run(signals, control) if signals.received is None else signals.received
        if supervisor.dead:
            status = 1
        elif signum is not None:
            logger.info("stopping on %s", signal.Signals(signum).name)
    return status
