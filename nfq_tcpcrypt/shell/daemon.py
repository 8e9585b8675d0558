"""Assembly of the daemon (host or gateway mode): keylog, engine, queues, injector, rules, control socket.

The two modes differ only in the rules (gateway mode matches the outside interfaces, README: Gateway mode)
and in the engine's `deliver_max` (settings.resolve_system); the engine is direction-based, so the
rest is the same.

Start order: signal handlers first (a SIGTERM during start-up still ends in cleanup), then the
queues are bound, the injector opened, the rules installed, and only then the control socket
listens, so that an answering control socket means "queue bound and rules in". Every
resource is released in reverse order on every exit path; the rules are removed before the queues
are unbound so that no packet waits on a queue nobody reads.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import signal
import time
from collections.abc import Callable, Collection
from typing import Any

from ..core.engine import Engine
from ..core.errors import ConfigError
from . import metrics, nfq, rules, settings
from .collector import Collector
from .control import CommandError, ControlServer
from .freshness import Freshness
from .inject import Injector
from .keylog import KeyLog
from .loop import EngineLike, EventLoop, SignalWatch
from .passthrough import PassThroughEngine
from .settings import DEFAULT_MARK, DEFAULT_QUEUE_NUM, DaemonOptions

__all__ = ["DEFAULT_MARK", "DEFAULT_QUEUE_NUM", "DaemonOptions", "run_daemon"]

logger = logging.getLogger(__name__)


def _peer(request: dict[str, Any]) -> bytes | None:
    """The packed address of a request's optional "peer"."""
    peer = request.get("peer")
    if peer is None:
        return None
    try:
        return ipaddress.ip_address(str(peer)).packed
    except ValueError:
        raise CommandError(f"peer {peer!r} is not an IP address") from None


def control_commands(engine: EngineLike, loop: EventLoop) -> dict[str, Any]:
    """The control socket's commands (README: control socket)."""

    def flush(request: dict[str, Any]) -> dict[str, int]:
        peer = _peer(request)
        reason = "operator request" + (f" for {request['peer']}" if peer else "")
        return {"flushed": engine.flush_cache(reason, peer)}

    return {
        "sessions": lambda request: engine.session_table(),
        "counters": lambda request: loop.all_counters(),
        "ping": lambda request: {"ok": True, "pid": os.getpid()},
        "cache": lambda request: engine.cache_info(time.monotonic()),
        "cache_flush": flush,
        "abort_all": lambda request: {"reset": abort_encrypted(engine, loop)},
    }


def abort_encrypted(engine: EngineLike, loop: EventLoop) -> int:
    """Reset every live encrypted connection toward both ends, now: the daemon is about to remove its
    rules, and such a connection must never go on in plaintext (README: Security model)."""
    count = engine.abort_all("daemon stopping", time.monotonic())
    loop.flush_injections()
    if count:
        logger.info("reset %d encrypted connections on the way out", count)
    return count


def make_reload(
    options: DaemonOptions, engine: EngineLike, secrets_log: Callable[[str], None] | None, counters: dict[str, int]
) -> Callable[[], None]:
    """The SIGHUP handler: re-read the config; new connections get the new TEP and AEAD lists,
    policy and engine settings; sessions in progress keep theirs, so no connection is dropped."""
    current = [options]
    counters.setdefault("reloads", 0)
    counters.setdefault("reload_failed", 0)

    def reload() -> None:
        try:
            fresh = settings.reload_options(current[0])
            config = fresh.configuration(secrets_log)
        except (ConfigError, OSError) as exc:
            counters["reload_failed"] += 1
            logger.error("reload failed, the running configuration stays: %s", exc)
            return
        if isinstance(engine, Engine):
            engine.config = config
        current[0] = fresh
        counters["reloads"] += 1
        logger.info(
            "configuration reloaded: tep %s, aead %s, %d policy rule(s)",
            fresh.teps, fresh.aeads, len(fresh.engine.get("policies", ())),
        )  # fmt: skip

    return reload


def metrics_writer(path: str, status: Callable[[], dict[str, Any]]) -> Callable[[], None]:
    """A callback that rewrites the metrics textfile at `path`; a failure is logged, never fatal."""

    def write() -> None:
        try:
            metrics.write_textfile(path, metrics.prometheus(status()))
        except OSError as exc:
            logger.warning("cannot write the metrics file %s: %s", path, exc)

    return write


def install_rules(options: DaemonOptions, workers: int = 1) -> rules.InstalledRules:
    """Install the mode's rules for `workers` pairs of queues, in every family `options` ask for
    (docs/architecture.md: Hooks, marks and conntrack)."""
    params = rules.RuleParams(
        options.queue_num,
        options.queue_num + 1,
        options.mark,
        options.fail_closed,
        options.local_mark,
        mode=options.mode,
        outside=options.outside,
        workers=workers,
    )
    return rules.install(params, ("ipv4", "ipv6") if options.ipv6 else ("ipv4",))


def status_commands(
    options: DaemonOptions, engine: EngineLike, loop: EventLoop, rule_lines: Callable[[], list[str]]
) -> tuple[dict[str, Any], Callable[[], dict[str, Any]]]:
    """Every control command of one daemon process, with `counters`, `status` and `metrics`, and the
    status document they are built from (README: Control socket)."""
    commands = control_commands(engine, loop)

    def counters() -> dict[str, int]:
        return {**loop.all_counters(), "cache_entries": len(engine.cache) if isinstance(engine, Engine) else 0}

    def status_doc() -> dict[str, Any]:
        meta = {"mode": options.mode, "workers": 1, "pid": os.getpid(),
                "queues": [options.queue_num, options.queue_num + 1], "rules": rule_lines(),
                "queue_backend": options.queue_backend, "queue_gso": settings.gso_enabled(options)}  # fmt: skip
        return metrics.status(counters(), meta)

    commands["counters"] = lambda request: counters()
    commands["status"] = lambda request: status_doc()
    commands["metrics"] = lambda request: {"text": metrics.prometheus(status_doc())}
    return commands, status_doc


def queue_binding(options: DaemonOptions) -> Callable[[], Any]:
    """The queue factory `options` ask for: backend, fail-open flag, GSO (README: Queue backends)."""
    return nfq.queue_factory(options.queue_backend, options.queue_fail_open, settings.gso_enabled(options))


def pin(cpus: Collection[int]) -> None:
    """Run this process on `cpus` only (README: CPU affinity); nothing when empty. Workers inherit it
    and then each narrows to its own (workers.py)."""
    if cpus:
        try:
            os.sched_setaffinity(0, cpus)
        except OSError as exc:  # checked at the start (settings.resolve_system), but cpusets change
            raise ConfigError(f"cpus: cannot run on {','.join(map(str, sorted(cpus)))}: {exc.strerror}") from None
        logger.info("running on CPU %s", ",".join(map(str, sorted(cpus))))


def _warn_without_forwarding(ipv6: bool) -> None:
    """A gateway that does not forward encrypts only its own connections: say so (refuse nothing)."""
    paths = ["/proc/sys/net/ipv4/ip_forward"]
    if ipv6:
        paths.append("/proc/sys/net/ipv6/conf/all/forwarding")
    for path in paths:
        with contextlib.suppress(OSError, ValueError), open(path, encoding="ascii") as handle:
            if int(handle.read().strip()) == 0:
                logger.warning("gateway mode, but %s is 0: inside hosts are not forwarded", path)


def run_daemon(options: DaemonOptions) -> int:
    """Run until SIGINT/SIGTERM; return the process exit status (0 when everything was cleaned up)."""
    status = 0
    if options.mode == "gateway":
        _warn_without_forwarding(options.ipv6)
    pin(options.cpus)
    workers = settings.worker_count(options)
    if workers > 1:
        from .workers import run_workers

        return run_workers(options, workers)
    with contextlib.ExitStack() as stack:
        signals = SignalWatch()
        stack.callback(signals.close)
        keylog = None
        if options.keylog:
            keylog = KeyLog(options.keylog)
            stack.callback(keylog.close)
        engine: EngineLike
        if options.pass_through:
            engine = PassThroughEngine()
        else:
            engine = Engine(options.configuration(keylog.write if keylog else None))
        freshness = Freshness.system(engine.flush_cache)
        stack.callback(freshness.close)
        injector = Injector(options.mark, options.local_mark)
        stack.callback(injector.close)
        loop = EventLoop(engine, options.queue_num, injector, signals, freshness, queue_binding(options))
        stack.callback(loop.close)
        loop.on_reload = make_reload(options, engine, keylog.write if keylog else None, loop.counters)
        logger.info("queues %d (inbound) and %d (outbound) bound (%s%s)", options.queue_num, options.queue_num + 1,
                    options.queue_backend, ", GSO" if settings.gso_enabled(options) else "")
        installed = install_rules(options)
        unreset: list[str] = []

        def remove_rules() -> None:
            nonlocal status
            problems = installed.keep(unreset[0]) if unreset else installed.remove()
            if problems:
                status = 1

        def abort() -> None:
            try:
                abort_encrypted(engine, loop)
            except Exception as exc:  # a broken engine: its connections must not leave in plaintext
                logger.exception("resetting the encrypted connections failed")
                unreset.append(f"the reset failed: {type(exc).__name__}")

        stack.callback(remove_rules)
        stack.callback(abort)  # runs before remove_rules
        commands, status_doc = status_commands(options, engine, loop, installed.lines)
        if options.metrics_file:
            loop.periodic = (metrics.METRICS_INTERVAL, metrics_writer(options.metrics_file, status_doc))
        control = ControlServer(options.control, commands)
        stack.callback(control.close)
        loop.control = control
        logger.info("control socket %s ready", options.control)
        if signals.received is None:
            loop.collector = Collector()
            signum = loop.run()
        else:
            signum = signals.received
        logger.info("stopping on %s", signal.Signals(signum).name)
    return status
