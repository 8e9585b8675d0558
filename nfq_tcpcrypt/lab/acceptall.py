"""A minimal queue program that accepts every packet: the floor of a queue round trip (README: Benchmark).

The benchmarks run it beside the daemon in the same run, on either queue backend, so the daemon's
cost over a bare round trip through NFQUEUE shows: `bench/throughput` (bulk) and `bench/handshake`
(sequential connections). On NetfilterQueue it is the binding's own blocking `run()`; on the fast
backend it is shell/fastqueue.py's FastQueue bound with the GSO flag (as the daemon binds it in host
mode), woken by epoll, every packet accepted unchanged.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator

from .net import Topology, wait_for_line

ACCEPT_QUEUE = 7950

PROGRAMS = {
    "netfilterqueue": r"""
import sys
from netfilterqueue import NetfilterQueue
queue = NetfilterQueue()
queue.bind(int(sys.argv[1]), lambda pkt: pkt.accept(), max_len=4096, sock_len=4 << 20)
print("accepting", flush=True)
queue.run()
""",
    "fast": r"""
import select, sys
from nfq_tcpcrypt.shell import nfnetlink
from nfq_tcpcrypt.shell.fastqueue import FastQueue
queue = FastQueue(nfnetlink.NFQA_CFG_F_GSO)
queue.bind(int(sys.argv[1]), lambda pkt: pkt.accept(), max_len=4096, sock_len=4 << 20)
poll = select.epoll()
poll.register(queue.get_fd(), select.EPOLLIN)
print("accepting", flush=True)
while True:
    poll.poll()
    queue.run(block=False)
""",
}
"""The accept-all program of each queue backend (argv[1]: the queue number)."""

HOOKS = {
    "INPUT/OUTPUT": (("filter", "INPUT"), ("filter", "OUTPUT")),
    "daemon's hooks": (("raw", "PREROUTING"), ("mangle", "POSTROUTING")),
}
"""Where the accept-all programs queue every TCP packet: iptables' INPUT and OUTPUT, or the hooks
the daemon's rules use (raw PREROUTING, mangle POSTROUTING; docs/architecture.md: Hooks)."""


@contextlib.contextmanager
def accept_all(topo: Topology, hooks: str, backend: str = "netfilterqueue",
               sides: tuple[str, ...] = ("a", "b")) -> Iterator[list[subprocess.Popen[bytes]]]:
    """The accept-all program of `backend` in each of `sides`, every TCP packet at `hooks` queued to
    it, for the block; its rules are deleted and the programs stopped afterwards."""
    procs: list[subprocess.Popen[bytes]] = []
    rules: list[tuple[str, list[str]]] = []
    try:
        for side in sides:
            proc = topo.popen(side, [sys.executable, "-u", "-c", PROGRAMS[backend], str(ACCEPT_QUEUE)],
                              stdout=subprocess.PIPE)  # fmt: skip
            procs.append(proc)
            wait_for_line(proc, proc.stdout, "accepting", 15.0, f"accept-all ({backend}) in {side}")
            for table, chain in HOOKS[hooks]:
                spec = [chain, "-p", "tcp", "-j", "NFQUEUE", "--queue-num", str(ACCEPT_QUEUE)]
                topo.check(side, ["iptables", "-t", table, "-I", *spec])
                rules.append((side, ["-t", table, "-D", *spec]))
        yield procs
    finally:
        for side, spec in rules:
            topo.check(side, ["iptables", *spec])
        for proc in procs:
            proc.terminate()
            proc.wait(10)
