"""Assembly of the daemon (host or gateway mode): keylog, engine, queues, injector, rules, control socket.

The two modes differ only in the rules (gateway mode matches the outside interfaces, DESIGN.md §1)
and in the engine's `deliver_max` (settings.resolve_system); the engine is direction-based, so the
rest is the same.

Start order: signal handlers first (a SIGTERM during start-up still ends in cleanup), then the
queues are bound, the injector opened, the rules installed, and only then the control socket
listens, so that an answering control socket means "queue bound and rules in" (issue 2). Every
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
from typing import Any

from ..core.engine import Engine
from . import rules
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
    }


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
        loop = EventLoop(engine, options.queue_num, injector, signals, freshness)
        stack.callback(loop.close)
        logger.info("queues %d (inbound) and %d (outbound) bound", options.queue_num, options.queue_num + 1)
        families = ("ipv4", "ipv6") if options.ipv6 else ("ipv4",)
        params = rules.RuleParams(
            options.queue_num,
            options.queue_num + 1,
            options.mark,
            options.fail_closed,
            options.local_mark,
            mode=options.mode,
            outside=options.outside,
        )
        installed = rules.install(params, families)

        def remove_rules() -> None:
            nonlocal status
            if installed.remove():
                status = 1
            else:
                logger.info("rules removed")

        stack.callback(remove_rules)

        def abort_encrypted() -> None:
            # Before the rules go: an encrypted connection is reset, never continued in plaintext.
            count = engine.abort_all("daemon stopping", time.monotonic())
            loop.flush_injections()
            if count:
                logger.info("reset %d encrypted connections on the way out", count)

        stack.callback(abort_encrypted)
        control = ControlServer(options.control, control_commands(engine, loop))
        stack.callback(control.close)
        loop.control = control
        logger.info("control socket %s ready", options.control)
        if signals.received is None:
            signum = loop.run()
        else:
            signum = signals.received
        logger.info("stopping on %s", signal.Signals(signum).name)
    return status
