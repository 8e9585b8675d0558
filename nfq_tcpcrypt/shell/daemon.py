"""Assembly of the host-mode daemon: keylog, engine, queues, injector, rules, control socket.

Start order: signal handlers first (a SIGTERM during start-up still ends in cleanup), then the
queues are bound, the injector opened, the rules installed, and only then the control socket
listens, so that an answering control socket means "queue bound and rules in" (issue 2). Every
resource is released in reverse order on every exit path; the rules are removed before the queues
are unbound so that no packet waits on a queue nobody reads.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from dataclasses import dataclass

from ..core.config import Configuration, parse_aeads, parse_teps
from ..core.engine import Engine
from . import rules
from .control import ControlServer
from .inject import Injector
from .keylog import KeyLog
from .loop import EngineLike, EventLoop, SignalWatch
from .passthrough import PassThroughEngine

logger = logging.getLogger(__name__)

DEFAULT_QUEUE_NUM = 7100
DEFAULT_MARK = 0x7463


@dataclass
class DaemonOptions:
    """What `nfq-tcpcrypt run` was asked to do."""

    mode: str = "host"
    queue_num: int = DEFAULT_QUEUE_NUM
    mark: int = DEFAULT_MARK
    control: str = "/run/nfq-tcpcrypt/control.sock"
    keylog: str | None = None
    teps: str = "x25519"
    aeads: str = "aes128gcm"
    fail_closed: bool = False
    ipv6: bool = False
    pass_through: bool = False


def run_daemon(options: DaemonOptions) -> int:
    """Run until SIGINT/SIGTERM; return the process exit status (0 when everything was cleaned up)."""
    if options.mode != "host":
        raise SystemExit(f"mode {options.mode!r} is not implemented yet (only 'host')")
    status = 0
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
            config = Configuration(
                teps=parse_teps(options.teps),
                aeads=parse_aeads(options.aeads),
                secrets_log=keylog.write if keylog else None,
            )
            engine = Engine(config)
        injector = Injector(options.mark)
        stack.callback(injector.close)
        loop = EventLoop(engine, options.queue_num, injector, signals)
        stack.callback(loop.close)
        logger.info("queues %d (inbound) and %d (outbound) bound", options.queue_num, options.queue_num + 1)
        families = ("ipv4", "ipv6") if options.ipv6 else ("ipv4",)
        params = rules.RuleParams(options.queue_num, options.queue_num + 1, options.mark, options.fail_closed)
        installed = rules.install(params, families)

        def remove_rules() -> None:
            nonlocal status
            if installed.remove():
                status = 1
            else:
                logger.info("rules removed")

        stack.callback(remove_rules)
        control = ControlServer(
            options.control,
            {
                "sessions": engine.session_table,
                "counters": loop.all_counters,
                "ping": lambda: {"ok": True, "pid": os.getpid()},
            },
        )
        stack.callback(control.close)
        loop.control = control
        logger.info("control socket %s ready", options.control)
        if signals.received is None:
            signum = loop.run()
        else:
            signum = signals.received
        logger.info("stopping on %s", signal.Signals(signum).name)
    return status
