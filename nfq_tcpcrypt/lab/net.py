"""Two-namespace lab topology and the helpers that move traffic across it (README: Benchmark, Layout).

One module, used by the integration tests, `nfq-tcpcrypt lab` and `bench/throughput`, so that each
thing (build the namespaces, start a daemon, capture, transfer a file) is done one way only.

Topology: namespaces "a" and "b" (named with the pid and a random tag, so runs never collide), each
with `lo` up, joined by a veth pair (MTU 1500, never `lo`: docs/architecture.md, "The NFQUEUE binding",
on the 4016-byte copy) with 10.77.0.1/24 in a and 10.77.0.2/24 in b. Nothing is configured outside them, and
`Topology.__exit__` always kills what it started there and deletes both, also on KeyboardInterrupt.

`Topology(router=True)` puts a third namespace "r" between them (middleboxes in the path):
a --veth-a/veth-ra-- r --veth-rb/veth-b-- b, two subnets (10.77.1.0/24 and 10.77.2.0/24, fd77:1::/64
and fd77:2::/64), each host's default route via r, forwarding on in r only. The hosts' addresses
are then `topo.addresses` (10.77.1.1 and 10.77.2.2); every helper here takes them from the topology.
Run as a gateway (`--mode gateway`), r's outside interface is `topo.outside["r"]` (veth-rb, toward b).

`Topology(gateways=True)` is two sites (README: Gateway mode): a --veth-a/veth-ga-- ga
--veth-gaw/veth-gbw-- gb --veth-gb/veth-b-- b. The inside links are 10.77.1.0/24 and 10.77.2.0/24 (the
same host addresses as the router shape), the "internet" between the gateways 10.77.3.0/24, ga
10.77.3.1 and gb 10.77.3.2 (fd77:1::/64, fd77:2::/64, fd77:3::/64). Each host's default route goes
via its gateway, each gateway's route to the other site via the other gateway; forwarding is on in
ga and gb only. `internet_routers=N` puts N routers (i1, i2, ...) between the gateways: link k of
the internet (`topo.internet_links[k]`) is then 10.77.(3+k).0/24, .1 on its left end, .2 on its right. `topo.ifnames`
names the wire-facing interface of every side (for ga and gb: the outside one, so `capture` and
`wire_loss` there act on the internet link), `topo.outside` and `topo.inside` the gateways' two
interfaces. `masquerade(gateway)` and `port_forward(gateway, ...)` add NAT on a gateway (README: NAT on
the gateway); `topo.public(gateway)` is its outside address.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import re
import secrets
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from pyroute2 import IPRoute, netns

ADDRESSES = {"a": "10.77.0.1", "b": "10.77.0.2"}
PREFIXLEN = 24
ADDRESSES6 = {"a": "fd77::1", "b": "fd77::2"}
PREFIXLEN6 = 64
IFNAMES = {"a": "veth-a", "b": "veth-b"}
MTU = 1500
# Routed topology (router=True): host addresses, the router's address on the link toward each side,
# and the router's interface toward each side.
ROUTED_ADDRESSES = {"a": "10.77.1.1", "b": "10.77.2.2"}
ROUTED_ADDRESSES6 = {"a": "fd77:1::1", "b": "fd77:2::2"}
ROUTER_ADDRESSES = {"a": "10.77.1.254", "b": "10.77.2.254"}
ROUTER_ADDRESSES6 = {"a": "fd77:1::fe", "b": "fd77:2::fe"}
ROUTER_IFNAMES = {"a": "veth-ra", "b": "veth-rb"}
# Two-site topology (gateways=True): gateway ga serves a, gb serves b; the internet link between them.
GATEWAY_INSIDE_IFNAMES = {"ga": "veth-ga", "gb": "veth-gb"}
GATEWAY_OUTSIDE_IFNAMES = {"ga": "veth-gaw", "gb": "veth-gbw"}
GATEWAY_INSIDE_ADDRESSES = {"ga": "10.77.1.254", "gb": "10.77.2.254"}
GATEWAY_INSIDE_ADDRESSES6 = {"ga": "fd77:1::fe", "gb": "fd77:2::fe"}
GATEWAY_OF = {"a": "ga", "b": "gb"}
HTTP_PORT = 8080
KEYLOG_ES = re.compile(r"^ES [0-9a-f]{64} (?:[0-9a-f]{2})+$", re.MULTILINE)  # N_A, then ES of any TEP


class LabError(RuntimeError):
    """A lab step did not happen within its bound; the message says which and what was seen."""


class Topology:
    """Context manager: two named network namespaces joined by a veth pair, through a router, or
    behind two gateways.

    With `router=True` a third namespace "r" forwards between a and b; with `gateways=True` two
    namespaces "ga" and "gb" do (see the module docstring). `addresses`, `addresses6` and `ifnames`
    give each host's address and veth name for every shape.
    """

    def __init__(
        self, tag: str = "nfqtc", router: bool = False, gateways: bool = False, internet_routers: int = 0
    ) -> None:
        if router and gateways:
            raise ValueError("router and gateways are two different shapes")
        if internet_routers and not gateways:
            raise ValueError("internet_routers only go between gateways")
        suffix = f"{os.getpid()}-{secrets.token_hex(2)}"
        self.router = router
        self.gateways = gateways
        self.internet_routers = tuple(f"i{n + 1}" for n in range(internet_routers))
        chain = ["ga", *self.internet_routers, "gb"]
        self.internet_links = [
            (
                (left, GATEWAY_OUTSIDE_IFNAMES["ga"] if left == "ga" else f"veth-{left}r"),
                (right, GATEWAY_OUTSIDE_IFNAMES["gb"] if right == "gb" else f"veth-{right}l"),
            )
            for left, right in itertools.pairwise(chain)
        ]
        """The links between the gateways, left (ga) to right (gb): ((side, ifname), (side, ifname))."""
        if gateways:
            sides: tuple[str, ...] = ("a", "ga", *self.internet_routers, "gb", "b")
        else:
            sides = ("a", "r", "b") if router else ("a", "b")
        self.names = {side: f"{tag}-{side}-{suffix}" for side in sides}
        routed = router or gateways
        self.addresses = dict(ROUTED_ADDRESSES if routed else ADDRESSES)
        self.addresses6 = dict(ROUTED_ADDRESSES6 if routed else ADDRESSES6)
        self.ifnames = dict(IFNAMES)
        self.outside: dict[str, str] = {}
        """Gateway side -> its outside interface (what `--outside` names)."""
        self.inside: dict[str, str] = {}
        """Gateway side -> its inside interface."""
        if router:
            self.outside = {"r": ROUTER_IFNAMES["b"]}
            self.inside = {"r": ROUTER_IFNAMES["a"]}
        if gateways:
            self.outside = dict(GATEWAY_OUTSIDE_IFNAMES)
            self.inside = dict(GATEWAY_INSIDE_IFNAMES)
            self.ifnames.update(GATEWAY_OUTSIDE_IFNAMES)
        self._procs: list[subprocess.Popen[Any]] = []
        self._created: list[str] = []
        self.daemons: list[Daemon] = []  # started by start_daemon; stopped (final counters) on close

    def __enter__(self) -> Self:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _build(self) -> None:
        for name in self.names.values():
            netns.create(name)
            self._created.append(name)
        if self.router:
            self._build_routed()
            return
        if self.gateways:
            self._build_gateways()
            return
        with IPRoute(netns=self.names["a"], flags=0) as ipr:
            ipr.link(
                "add",
                ifname=IFNAMES["a"],
                kind="veth",
                peer={"ifname": IFNAMES["b"], "net_ns_fd": self.names["b"]},
            )
        for side in ("a", "b"):
            self._configure(side, IFNAMES[side], ADDRESSES[side], ADDRESSES6[side])

    def _configure(self, side: str, ifname: str, address: str, address6: str, lo: bool = True) -> None:
        """Bring `lo` (optionally) and `ifname` up in `side` with its IPv4 and IPv6 addresses."""
        # No duplicate address detection on the link-local address either: while it is tentative,
        # neighbour discovery through a router waits (the first SYN of an IPv6 test was lost, ~2 s).
        self.check(side, ["sysctl", "-qw", f"net.ipv6.conf.{ifname}.accept_dad=0"])
        with IPRoute(netns=self.names[side], flags=0) as ipr:
            if lo:
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            index = ipr.link_lookup(ifname=ifname)[0]
            ipr.link("set", index=index, mtu=MTU)
            ipr.addr("add", index=index, address=address, prefixlen=PREFIXLEN)
            ipr.link("set", index=index, state="up")
        # IPv6 without duplicate address detection, so the address is usable at once.
        self.check(side, ["ip", "-6", "addr", "add", f"{address6}/{PREFIXLEN6}", "dev", ifname, "nodad"])

    def _build_routed(self) -> None:
        for side in ("a", "b"):
            with IPRoute(netns=self.names[side], flags=0) as ipr:
                ipr.link(
                    "add",
                    ifname=IFNAMES[side],
                    kind="veth",
                    peer={"ifname": ROUTER_IFNAMES[side], "net_ns_fd": self.names["r"]},
                )
        for index, side in enumerate(("a", "b")):
            self._configure(side, IFNAMES[side], ROUTED_ADDRESSES[side], ROUTED_ADDRESSES6[side])
            self._configure(
                "r", ROUTER_IFNAMES[side], ROUTER_ADDRESSES[side], ROUTER_ADDRESSES6[side], lo=index == 0
            )
            self.check(side, ["ip", "route", "add", "default", "via", ROUTER_ADDRESSES[side]])
            self.check(side, ["ip", "-6", "route", "add", "default", "via", ROUTER_ADDRESSES6[side]])
        self.check("r", ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        self.check("r", ["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])

    def _build_gateways(self) -> None:
        for host, gateway in GATEWAY_OF.items():
            with IPRoute(netns=self.names[host], flags=0) as ipr:
                ipr.link(
                    "add",
                    ifname=IFNAMES[host],
                    kind="veth",
                    peer={"ifname": GATEWAY_INSIDE_IFNAMES[gateway], "net_ns_fd": self.names[gateway]},
                )
        for left, right in self.internet_links:
            with IPRoute(netns=self.names[left[0]], flags=0) as ipr:
                peer = {"ifname": right[1], "net_ns_fd": self.names[right[0]]}
                ipr.link("add", ifname=left[1], kind="veth", peer=peer)
        for host, gateway in GATEWAY_OF.items():
            self._configure(host, IFNAMES[host], ROUTED_ADDRESSES[host], ROUTED_ADDRESSES6[host])
            self._configure(
                gateway,
                GATEWAY_INSIDE_IFNAMES[gateway],
                GATEWAY_INSIDE_ADDRESSES[gateway],
                GATEWAY_INSIDE_ADDRESSES6[gateway],
            )
            self.check(host, ["ip", "route", "add", "default", "via", GATEWAY_INSIDE_ADDRESSES[gateway]])
            self.check(host, ["ip", "-6", "route", "add", "default", "via", GATEWAY_INSIDE_ADDRESSES6[gateway]])
        # Link k of the internet is 10.77.(3+k).0/24 (fd77:(3+k)::/64): .1 on its left end, .2 on its right.
        chain = ["ga", *self.internet_routers, "gb"]
        for k, (left, right) in enumerate(self.internet_links):
            for (side, ifname), host_id in ((left, 1), (right, 2)):
                self._configure(
                    side, ifname, f"10.77.{3 + k}.{host_id}", f"fd77:{3 + k}::{host_id}", lo=side not in ("ga", "gb")
                )
        # Every node of the chain reaches site A leftwards and site B rightwards (no default route: no loop).
        for k, node in enumerate(chain):
            if k > 0:
                self.check(node, ["ip", "route", "add", "10.77.1.0/24", "via", f"10.77.{2 + k}.1"])
                self.check(node, ["ip", "-6", "route", "add", "fd77:1::/64", "via", f"fd77:{2 + k}::1"])
            if k < len(chain) - 1:
                self.check(node, ["ip", "route", "add", "10.77.2.0/24", "via", f"10.77.{3 + k}.2"])
                self.check(node, ["ip", "-6", "route", "add", "fd77:2::/64", "via", f"fd77:{3 + k}::2"])
            self.check(node, ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
            self.check(node, ["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])

    def public(self, gateway: str, ipv6: bool = False) -> str:
        """The address of `gateway` ("ga" or "gb") on its outside (internet) link."""
        k, end = (0, 1) if gateway == "ga" else (len(self.internet_links) - 1, 2)
        return f"fd77:{3 + k}::{end}" if ipv6 else f"10.77.{3 + k}.{end}"

    def _site_only_behind(self, gateway: str, ipv6: bool) -> None:
        """Every other node of the chain forgets its route to `gateway`'s site: only NAT reaches it."""
        site = ("fd77:1::/64" if ipv6 else "10.77.1.0/24") if gateway == "ga" else (
            "fd77:2::/64" if ipv6 else "10.77.2.0/24")  # fmt: skip
        for node in ("ga", *self.internet_routers, "gb"):
            if node != gateway:
                self.check(node, ["ip", *(["-6"] if ipv6 else []), "route", "del", site])

    def masquerade(self, gateway: str, ipv6: bool = False, ports: str = "40000-40100") -> None:
        """Site NAT on `gateway`: MASQUERADE (source ports mapped into `ports`) what leaves through its
        outside interface; the rest of the internet no longer routes to the inside addresses."""
        tool = "ip6tables" if ipv6 else "iptables"
        self.check(gateway, [tool, "-t", "nat", "-A", "POSTROUTING", "-o", self.outside[gateway],
                             "-p", "tcp", "-j", "MASQUERADE", "--to-ports", ports])  # fmt: skip
        self.check(gateway, [tool, "-t", "nat", "-A", "POSTROUTING", "-o", self.outside[gateway], "-j", "MASQUERADE"])
        self._site_only_behind(gateway, ipv6)

    def port_forward(self, gateway: str, port: int, host: str, host_port: int, ipv6: bool = False) -> None:
        """DNAT on `gateway`: TCP to its public address, port `port`, goes to `host`:`host_port` inside."""
        tool = "ip6tables" if ipv6 else "iptables"
        address = (self.addresses6 if ipv6 else self.addresses)[host]
        target = f"[{address}]:{host_port}" if ipv6 else f"{address}:{host_port}"
        self.check(gateway, [tool, "-t", "nat", "-A", "PREROUTING", "-i", self.outside[gateway], "-p", "tcp",
                             "-d", self.public(gateway, ipv6), "--dport", str(port),
                             "-j", "DNAT", "--to-destination", target])  # fmt: skip

    def check(self, side: str, command: Sequence[str], timeout: float = 30.0, **kwargs: Any) -> str:
        """Run `command` in `side`; its stdout, or LabError with its stderr when it fails."""
        result = self.run(side, command, timeout=timeout, **kwargs)
        if result.returncode != 0:
            raise LabError(f"{' '.join(command)} in {side} failed ({result.returncode}): {result.stderr.strip()}")
        return str(result.stdout)

    def set_mtu(self, side: str, ifname: str, mtu: int) -> None:
        """Set the MTU of `ifname` in `side` (e.g. both ends of the r-b link: ("r", "veth-rb"), ("b", "veth-b"))."""
        self.check(side, ["ip", "link", "set", "dev", ifname, "mtu", str(mtu)])

    def argv(self, side: str, command: Sequence[str]) -> list[str]:
        """`command` wrapped to run inside namespace `side`."""
        return ["ip", "netns", "exec", self.names[side], *command]

    def run(
        self, side: str, command: Sequence[str], timeout: float = 60.0, **kwargs: Any
    ) -> subprocess.CompletedProcess[Any]:
        """Run `command` in `side` to completion (bounded by `timeout`)."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(self.argv(side, command), timeout=timeout, check=False, **kwargs)

    def popen(self, side: str, command: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start `command` in `side`; the topology kills it on exit if it still runs."""
        proc = subprocess.Popen(self.argv(side, command), **kwargs)
        self._procs.append(proc)
        return proc

    def close(self) -> None:
        """Stop our daemons (keeping their final counters), kill what else we started (by pid),
        then delete the namespaces. Idempotent."""
        for daemon in self.daemons:
            daemon.stop(10.0)
        self.daemons.clear()
        for proc in reversed(self._procs):
            _terminate(proc, 5.0)
        self._procs.clear()
        for name in self._created:
            for pid in _netns_pids(name):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(OSError):
                netns.remove(name)
        self._created.clear()


def _netns_pids(name: str) -> list[int]:
    """Pids of processes still inside namespace `name` (all of them were started by this topology)."""
    result = subprocess.run(
        ["ip", "netns", "pids", name], capture_output=True, text=True, timeout=10, check=False
    )
    return [int(word) for word in result.stdout.split() if word.isdigit()]


def _terminate(proc: subprocess.Popen[Any], timeout: float) -> int | None:
    """SIGTERM, bounded wait, then SIGKILL; the process's return code."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    return proc.returncode


def wait_for_line(proc: subprocess.Popen[Any], stream: Any, pattern: str, timeout: float, what: str) -> str:
    """Read `stream` of `proc` until a line contains `pattern`; LabError after `timeout` or on exit."""
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    fd = stream.fileno()
    buf = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], max(0.0, min(0.2, deadline - time.monotonic())))
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                text = line.decode(errors="replace")
                seen.append(text)
                if pattern in text:
                    return text
        elif proc.poll() is not None:
            break
    raise LabError(f"{what}: no line with {pattern!r} within {timeout}s; saw {seen[-5:]!r}, rc={proc.poll()}")


def start_ready(
    topo: Topology, side: str, command: Sequence[str], ready: str, timeout: float = 15.0
) -> subprocess.Popen[Any]:
    """Start `command` in `side` with stdout piped; return once it printed a line containing `ready`."""
    proc = topo.popen(side, command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_line(proc, proc.stdout, ready, timeout, " ".join(command[:3]))
    return proc


# --- the daemon --------------------------------------------------------------------------------


@dataclass
class Daemon:
    """One `nfq-tcpcrypt run` subprocess inside a namespace, with its control socket and logs."""

    side: str
    proc: subprocess.Popen[Any]
    control: str
    keylog: str
    log: str
    final_counters: dict[str, int] | None = None
    """The counters as the daemon reported them just before `stop` ended it (None: no answer)."""

    def stop(self, timeout: float = 20.0) -> int | None:
        """Fetch the final counters, SIGTERM and wait; the exit status (None when it had to be killed)."""
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, ValueError, LabError):
                self.final_counters = self.counters()
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
                return None
        return self.proc.returncode

    def sessions(self) -> list[dict[str, Any]]:
        """The session table, fetched with `nfq-tcpcrypt sessions --json` (the user's way)."""
        result = subprocess.run(
            [sys.executable, "-m", "nfq_tcpcrypt", "sessions", "--json", "--control", self.control],
            capture_output=True,
            text=True,
            timeout=15,
            check=False,
        )
        if result.returncode != 0:
            raise LabError(f"sessions on {self.side} failed: {result.stderr.strip()}")
        import json

        table: list[dict[str, Any]] = json.loads(result.stdout)
        return table

    def counters(self) -> dict[str, int]:
        """Engine and shell counters from the control socket."""
        from ..shell.control import query

        counters: dict[str, int] = query(self.control, "counters")
        return counters


SHELL_FAULTS = ("shell.handler_errors", "shell.truncated_accepted", "shell.inject_failed")

STARTED: list[Daemon] = []
"""Every daemon `start_daemon` started in this process, for checks after a test (failed injections)."""


def failed_injections(daemon: Daemon) -> int:
    """Packets the daemon failed to inject: its `shell.inject_failed` counter at stop, or, when it
    could not answer then, the injection warnings in its log."""
    if daemon.final_counters is not None:
        return daemon.final_counters.get("shell.inject_failed", 0)
    with contextlib.suppress(OSError):
        return Path(daemon.log).read_text(errors="replace").count("injection of a ")
    return 0


def shell_faults(counters: dict[str, int]) -> dict[str, int]:
    """The nonzero counters that mean the shell saw trouble: engine exceptions, truncated copies, failed sends."""
    return {name: value for name, value in counters.items() if name in SHELL_FAULTS and value}


QUEUE_BACKEND_ENV = "NFQ_TCPCRYPT_QUEUE_BACKEND"
"""The environment variable that picks the daemons' queue backend in start_daemon (the integration
tests set it per test, once for each backend: tests/integration/conftest.py)."""


def backend_args() -> list[str]:
    """`--queue-backend B` for a daemon command line, B from NFQ_TCPCRYPT_QUEUE_BACKEND; [] when unset
    (the daemon's default)."""
    backend = os.environ.get(QUEUE_BACKEND_ENV)
    return ["--queue-backend", backend] if backend else []


def tree_program(tree: Path) -> list[str]:
    """The daemon of another source tree (`start_daemon(program=...)`), for benchmarks that measure
    a baseline in the same run. `-P`: `python -m` would put the working directory first on the
    path, and run from a tree's root the "baseline" would be that tree's own code."""
    return ["env", f"PYTHONPATH={tree.resolve()}", sys.executable, "-P", "-m", "nfq_tcpcrypt"]


def start_daemon(
    topo: Topology,
    side: str,
    workdir: Path,
    extra: Sequence[str] = (),
    timeout: float = 20.0,
    mode: str = "host",
    program: Sequence[str] | None = None,
    keylog: bool = True,
) -> Daemon:
    """Start the daemon in `side` and wait until its control socket answers (queue bound, rules in).

    With `mode="gateway"` it runs `--mode gateway --outside topo.outside[side]`. `program` replaces
    `python -m nfq_tcpcrypt` (e.g. the `nfq-tcpcrypt` script of another installation);
    `keylog=False` runs it without `--keylog`, as a production daemon runs (the benchmarks). The
    environment variable NFQ_TCPCRYPT_QUEUE_BACKEND, when set, becomes `--queue-backend` (unless
    `extra` names one), so the integration suite runs on either backend.
    """
    from ..shell.control import query

    control = str(workdir / f"{side}.sock")
    keylog_path = str(workdir / f"{side}.keys")
    log = str(workdir / f"{side}.log")
    mode_args = ["--mode", mode]
    if "--queue-backend" not in extra:
        mode_args += backend_args()
    if mode == "gateway":
        mode_args += ["--outside", topo.outside[side]]
    command = [
        *(program or (sys.executable, "-m", "nfq_tcpcrypt")), "run", *mode_args,
        "--control", control, *(("--keylog", keylog_path) if keylog else ()), *extra,
    ]  # fmt: skip
    with open(log, "ab") as log_file:
        proc = topo.popen(side, command, stdout=log_file, stderr=subprocess.STDOUT)
    daemon = Daemon(side, proc, control, keylog_path, log)
    STARTED.append(daemon)
    topo.daemons.append(daemon)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LabError(f"daemon in {side} exited with {proc.returncode}: {Path(log).read_text()[-2000:]}")
        with contextlib.suppress(OSError, ValueError):
            if query(control, "ping", timeout=1.0).get("ok"):
                return daemon
        time.sleep(0.05)
    daemon.stop()
    raise LabError(f"daemon in {side} not ready within {timeout}s: {Path(log).read_text()[-2000:]}")


# --- capture, files, HTTP -------------------------------------------------------------------------


@dataclass
class CaptureStats:
    """What tcpdump said when it stopped: packets captured, and dropped by the kernel."""

    path: Path
    captured: int | None = None
    dropped: int | None = None


@contextlib.contextmanager
def capture(
    topo: Topology, side: str, path: Path, timeout: float = 15.0, ifname: str | None = None,
    bpf: str = "tcp",
) -> Iterator[CaptureStats]:
    """tcpdump (-s 0, packets matching `bpf`) on `side`'s veth (or `ifname`) into `path`.

    The file is flushed when the block ends."""
    proc = topo.popen(
        side,
        [
            "tcpdump",
            "-i",
            ifname or topo.ifnames[side],
            "-s",
            "0",
            "-B",
            "32768",
            "--immediate-mode",
            "-U",
            "-n",
            "-Z",
            "root",
            "-w",
            str(path),
            bpf,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    stats = CaptureStats(path)
    try:
        wait_for_line(proc, proc.stderr, "listening on", timeout, "tcpdump")
        yield stats
    finally:
        _wait_until_stable(path, settle=0.3, timeout=5.0)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate(timeout=timeout)
        text = err.decode(errors="replace") if err else ""
        if match := re.search(r"(\d+) packets? captured", text):
            stats.captured = int(match.group(1))
        if match := re.search(r"(\d+) packets? dropped by kernel", text):
            stats.dropped = int(match.group(1))


def _wait_until_stable(path: Path, settle: float, timeout: float) -> None:
    """Wait until `path` has not grown for `settle` seconds (tcpdump has written what it saw)."""
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        size = path.stat().st_size if path.exists() else 0
        if size != last:
            last, since = size, time.monotonic()
        elif time.monotonic() - since >= settle:
            return
        time.sleep(0.05)


def make_payload(path: Path, size: int, markers: int = 8, marker_len: int = 32) -> list[bytes]:
    """Write `size` random bytes to `path`; return `markers` chunks of it to look for on the wire."""
    data = secrets.token_bytes(size)
    path.write_bytes(data)
    step = max(1, (size - marker_len) // markers)
    return [data[i * step + 7 : i * step + 7 + marker_len] for i in range(markers)]


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_NO_DNS = "import socket\nsocket.getfqdn = lambda name='': name\n"
"""Prelude of the lab's HTTP servers: http.server names its bound address with socket.getfqdn, a
reverse DNS query; from a namespace whose only way out is a router that drops it, that waits for the
resolver's timeouts (about 10 s) before the server listens."""
_HTTP_SERVER = _NO_DNS + (
    "import runpy, sys\nsys.argv[0] = 'http.server'\nrunpy.run_module('http.server', run_name='__main__')\n"
)
_BACKLOG_SERVER = _NO_DNS + (
    "import functools, http.server, sys\n"
    "port, address, directory, backlog = sys.argv[1:]\n"
    "http.server.ThreadingHTTPServer.request_queue_size = int(backlog)\n"
    "handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=directory)\n"
    "server = http.server.ThreadingHTTPServer\n"
    "http.server.test(HandlerClass=handler, ServerClass=server, port=int(port), bind=address)\n"
)


@contextlib.contextmanager
def http_server(
    topo: Topology,
    side: str,
    directory: Path,
    timeout: float = 15.0,
    ipv6: bool = False,
    address: str | None = None,
    backlog: int | None = None,
) -> Iterator[str]:
    """`python3 -m http.server` serving `directory` in `side` (on its veth address unless `address`).

    `backlog` replaces its listen backlog of 5 (for many connections opened at once)."""
    address = address or (topo.addresses6 if ipv6 else topo.addresses)[side]
    if backlog is None:
        command = [sys.executable, "-u", "-c", _HTTP_SERVER, str(HTTP_PORT), "--bind", address,
                   "--directory", str(directory)]  # fmt: skip
    else:
        command = [sys.executable, "-u", "-c", _BACKLOG_SERVER, str(HTTP_PORT), address, str(directory), str(backlog)]
    proc = topo.popen(side, command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        wait_for_line(proc, proc.stdout, "Serving HTTP", timeout, "http.server")
        yield f"http://[{address}]:{HTTP_PORT}" if ipv6 else f"http://{address}:{HTTP_PORT}"
    finally:
        _terminate(proc, 5.0)
        if proc.stdout is not None:
            proc.stdout.close()


def fetch(topo: Topology, side: str, url: str, out: Path, timeout: float = 120.0) -> None:
    """curl `url` from `side` into `out`; LabError on failure."""
    result = topo.run(
        side,
        ["curl", "-sS", "--fail", "--max-time", str(int(timeout)), "-o", str(out), url],
        timeout=timeout + 10,
    )
    if result.returncode != 0:
        raise LabError(f"curl {url} from {side} failed ({result.returncode}): {result.stderr.strip()}")


def drop_on_wire(topo: Topology, side: str, probability: float, ipv6: bool = False) -> None:
    """Drop `probability` of the TCP packets arriving at `side` from the wire, before the daemon.

    The rule goes first in raw PREROUTING (inserted after the daemon's own jump), so the loss hits
    wire-space packets, as a lossy link would. It disappears with the namespace.
    """
    tool = "ip6tables" if ipv6 else "iptables"
    rule = _loss_rule(topo, side, probability)
    result = topo.run(side, [tool, "-t", "raw", "-I", "PREROUTING", "1", *rule], timeout=10)
    if result.returncode != 0:
        raise LabError(f"cannot add the loss rule in {side}: {result.stderr.strip()}")


_ETHTOOL = r"""
import ctypes, fcntl, socket, struct, sys
value = ctypes.create_string_buffer(struct.pack("II", int(sys.argv[2], 0), int(sys.argv[3])))
request = struct.pack("16sP", sys.argv[1].encode(), ctypes.addressof(value)).ljust(40, b"\0")
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
    fcntl.ioctl(sock.fileno(), 0x8946, request)  # SIOCETHTOOL
print(struct.unpack("II", value.raw[:8])[1])
"""
"""Runs one legacy ethtool command (argv: interface, command, value) and prints the value after it."""
_ETHTOOL_STSO = 0x1F
_ETHTOOL_GGRO = 0x2B
_ETHTOOL_SGRO = 0x2C


def _ethtool(topo: Topology, side: str, ifname: str, command: int, value: int = 0) -> int:
    """One legacy SIOCETHTOOL command on `side`'s `ifname`; the value it leaves (for a get)."""
    result = topo.run(side, [sys.executable, "-c", _ETHTOOL, ifname, hex(command), str(value)], timeout=10)
    if result.returncode != 0:
        raise LabError(f"ethtool {command:#x} on {side}'s {ifname}: {result.stderr.strip()}")
    return int(result.stdout.strip() or 0)


def segment_on_wire(topo: Topology, side: str, ifname: str | None = None) -> None:
    """Turn TCP segmentation offload off on `side`'s interface toward the wire (its `ifnames` entry):
    the stack still builds GSO super-packets (the daemon's queue gets them whole), and the kernel
    segments them when they leave, so the wire carries MTU-sized packets, as from a NIC. On veth
    pairs with offload on, a super-packet crosses the wire and the router whole (64 KiB lost at
    once, the receiver gets it whole)."""
    _ethtool(topo, side, ifname or topo.ifnames[side], _ETHTOOL_STSO, 0)


def gro_on_arrival(topo: Topology, side: str) -> None:
    """Turn GRO on where the wire's packets arrive at `side` (its `ifnames` entry), as a receiving NIC
    does: in-order MTU-sized segments are merged into super-packets before the daemon's queue (raw
    PREROUTING) sees them. veth merges only through its NAPI path, which GRO on the receiving end
    turns on, and only for packets whose sending end has TSO off: so TSO goes off on the peer's
    end too (the router's interface toward `side`, or the other host's on a direct link; neither
    sends super-packets then). Loss in the router still hits MTU-sized packets. Routed and direct
    topologies only."""
    if topo.gateways:
        raise LabError("gro_on_arrival: routed and direct topologies only")
    if topo.router:
        _ethtool(topo, "r", ROUTER_IFNAMES[side], _ETHTOOL_STSO, 0)
    else:
        other = "b" if side == "a" else "a"
        _ethtool(topo, other, topo.ifnames[other], _ETHTOOL_STSO, 0)
    _ethtool(topo, side, topo.ifnames[side], _ETHTOOL_SGRO, 1)
    if _ethtool(topo, side, topo.ifnames[side], _ETHTOOL_GGRO) != 1:
        raise LabError(f"GRO stays off on {side}'s {topo.ifnames[side]}")


@contextlib.contextmanager
def wire_loss(
    topo: Topology, probability: float, sides: Sequence[str] = ("a", "b"), ipv6: bool = False
) -> Iterator[None]:
    """`drop_on_wire` on `sides` for the block, then the loss rules are deleted again.

    Enter it after the daemons started, so that the loss rule comes first in raw PREROUTING.
    """
    tool = "ip6tables" if ipv6 else "iptables"
    added: list[str] = []
    try:
        for side in sides:
            drop_on_wire(topo, side, probability, ipv6)
            added.append(side)
        yield
    finally:
        for side in added:
            rule = _loss_rule(topo, side, probability)
            topo.run(side, [tool, "-t", "raw", "-D", "PREROUTING", *rule], timeout=10)


def _loss_rule(topo: Topology, side: str, probability: float) -> list[str]:
    """Random loss of TCP packets arriving from the wire interface only: what the daemon injects
    toward its own stack travels over lo and must not be lost as if it crossed a link."""
    return ["-i", topo.ifnames[side], "-p", "tcp", "-m", "statistic", "--mode", "random",
            "--probability", str(probability), "-j", "DROP"]  # fmt: skip


# --- the whole experiment --------------------------------------------------------------------------


@dataclass
class TransferResult:
    """Everything the test and the lab check about one HTTP transfer from b to a."""

    sent_sha256: str
    received_sha256: str
    wire: Any  # tools.pcapcheck.WireReport
    sessions: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    counters: dict[str, dict[str, int]] = field(default_factory=dict)
    keylogs: dict[str, str] = field(default_factory=dict)
    daemons: dict[str, Daemon] = field(default_factory=dict)
    pcap: Path | None = None
    capture: CaptureStats | None = None
    fetch_seconds: float = 0.0
    inside_wire: Any = None  # tools.pcapcheck.WireReport of the `inside_capture_at` capture, if any
    inside_pcap: Path | None = None

    def session_for(self, side: str) -> dict[str, Any] | None:
        """The session of the HTTP connection in `side`'s table, if any."""
        port = f":{HTTP_PORT}"
        for entry in self.sessions.get(side, []):
            local, remote = str(entry.get("local", "")), str(entry.get("remote", ""))
            if local.endswith(port) or remote.endswith(port):
                return entry
        return None


def http_transfer(
    topo: Topology,
    workdir: Path,
    size: int = 4 * 1024 * 1024,
    daemon_sides: Sequence[str] = ("a", "b"),
    timeout: float = 120.0,
    ipv6: bool = False,
    wire_loss: float = 0.0,
    gateway_sides: Sequence[str] = (),
    capture_at: tuple[str, str | None] = ("a", None),
    inside_capture_at: tuple[str, str | None] | None = None,
    loss_sides: Sequence[str] = ("a", "b"),
    daemon_args: Mapping[str, Sequence[str]] | None = None,
    daemon_program: Sequence[str] | None = None,
) -> TransferResult:
    """Serve a random file from b, fetch it with curl from a, capture a's veth, query the daemons.

    Daemons are started on `daemon_sides` (with `--ipv6` when `ipv6`) and stopped (SIGTERM) before
    returning; their exit codes are in `result.daemons[side].proc.returncode`. The sides in
    `gateway_sides` (a subset of `daemon_sides`) run in gateway mode (`start_daemon`). With
    `wire_loss`, each of `loss_sides` drops that fraction of TCP packets arriving on its wire
    interface before the daemon sees them (see `drop_on_wire`). `daemon_args` adds options per side;
    `daemon_program` runs another installation's daemon (see `start_daemon`).

    The wire capture is taken on `capture_at` = (side, interface; None: the side's `ifnames`), and
    analysed into `result.wire`; `inside_capture_at` adds a second capture (e.g. on an inside link
    of a gateway), analysed into `result.inside_wire`.
    """
    from ..tools.pcapcheck import analyze

    served = workdir / "www"
    served.mkdir(exist_ok=True)
    source = served / "payload.bin"
    markers = make_payload(source, size)
    received = workdir / "received.bin"
    pcap = workdir / "wire.pcap"
    inside_pcap = workdir / "inside.pcap" if inside_capture_at is not None else None
    daemons: dict[str, Daemon] = {}
    try:
        for side in daemon_sides:
            mode = "gateway" if side in gateway_sides else "host"
            extra = [*(["--ipv6"] if ipv6 else []), *(daemon_args or {}).get(side, ())]
            daemons[side] = start_daemon(topo, side, workdir, extra, mode=mode, program=daemon_program)
        for side in loss_sides if wire_loss else ():
            drop_on_wire(topo, side, wire_loss, ipv6)
        with contextlib.ExitStack() as captures:
            capture_stats = captures.enter_context(capture(topo, capture_at[0], pcap, ifname=capture_at[1]))
            if inside_capture_at is not None and inside_pcap is not None:
                captures.enter_context(capture(topo, inside_capture_at[0], inside_pcap, ifname=inside_capture_at[1]))
            with http_server(topo, "b", served, ipv6=ipv6) as url:
                started = time.monotonic()
                fetch(topo, "a", f"{url}/payload.bin", received, timeout)
                fetch_seconds = time.monotonic() - started
            sessions = {side: daemon.sessions() for side, daemon in daemons.items()}
            counters = {side: daemon.counters() for side, daemon in daemons.items()}
    finally:
        for daemon in daemons.values():
            daemon.stop()
    needles = {f"marker{i}": marker for i, marker in enumerate(markers)}
    needles["http-status-line"] = b"HTTP/1.0 200"
    addresses = topo.addresses6 if ipv6 else topo.addresses
    return TransferResult(
        sent_sha256=sha256_file(source),
        received_sha256=sha256_file(received),
        wire=analyze(pcap, addresses["a"], addresses["b"], HTTP_PORT, needles),
        sessions=sessions,
        counters=counters,
        keylogs=_keylogs(daemons),
        daemons=daemons,
        pcap=pcap,
        capture=capture_stats,
        fetch_seconds=fetch_seconds,
        inside_wire=None if inside_pcap is None else analyze(inside_pcap, addresses["a"], addresses["b"],
                                                             HTTP_PORT, needles),
        inside_pcap=inside_pcap,
    )


def _keylogs(daemons: Mapping[str, Daemon]) -> dict[str, str]:
    """Each daemon's key log, for those that wrote one."""
    return {side: Path(d.keylog).read_text() for side, d in daemons.items() if Path(d.keylog).exists()}


def daemon_rules(topo: Topology, side: str, ipv6: bool = False) -> list[str]:
    """The daemon's rules left in `side` (`iptables-save` lines naming NFQ_TCPCRYPT); [] when clean."""
    text = topo.check(side, ["ip6tables-save" if ipv6 else "iptables-save"])
    return [line for line in text.splitlines() if "NFQ_TCPCRYPT" in line]


def rule_packets(
    topo: Topology, side: str, table: str, chain: str, match: str, ipv6: bool = False
) -> int:
    """Packets counted by the rules of `table`/`chain` in `side` whose `iptables -S` text contains `match`."""
    text = topo.check(side, ["ip6tables" if ipv6 else "iptables", "-t", table, "-S", chain, "-v"])
    total = 0
    for line in text.splitlines():
        if match in line and (found := re.search(r"-c (\d+) \d+", line)):
            total += int(found.group(1))
    return total


# --- throughput ------------------------------------------------------------------------------------

IPERF_PORT = 5201


def iperf3_throughput(topo: Topology, seconds: float = 5.0, timeout: float = 60.0, streams: int = 1) -> float:
    """iperf3 from a (client) to b (server) for `seconds` with `streams` parallel connections; the
    receiver's rate in bit/s."""
    import json

    server = topo.popen(
        "b",
        ["iperf3", "-s", "-1", "--forceflush", "-B", topo.addresses["b"], "-p", str(IPERF_PORT)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_line(server, server.stdout, "Server listening", 15.0, "iperf3 -s")
        result = topo.run(
            "a",
            ["iperf3", "-c", topo.addresses["b"], "-p", str(IPERF_PORT), "-t", str(seconds), "-P", str(streams), "-J"],
            timeout=timeout,
        )
        if result.returncode != 0:
            raise LabError(
                f"iperf3 client failed ({result.returncode}): {result.stdout[-1000:]} {result.stderr[-500:]}"
            )
        report = json.loads(result.stdout)
        return float(report["end"]["sum_received"]["bits_per_second"])
    finally:
        _terminate(server, 5.0)
        if server.stdout is not None:
            server.stdout.close()


# --- traffic both ways at once ----------------------------------------------------------------------

DUPLEX_PORT = 8090


@dataclass
class DuplexResult:
    """One `lab.duplex` run between a (client) and b (server): what each side received."""

    client: dict[str, Any]
    server: dict[str, Any]
    a_sends: int
    b_sends: int
    seconds: float
    problems: list[str] = field(default_factory=list)
    """Per connection, what differs from the expected bytes (empty: all digests equal both ways)."""


def duplex_needles(a_sends: int, b_sends: int, count: int = 8, length: int = 32) -> dict[str, bytes]:
    """Chunks of both directions' payloads to look for on the wire (plaintext leaks)."""
    from .duplex import payload

    needles = {}
    for role, size in (("client", a_sends), ("server", b_sends)):
        data = payload(role, size)
        step = max(1, (size - length) // count)
        for i in range(count):
            if i * step + 7 + length <= size:
                needles[f"{role}{i}"] = data[i * step + 7 : i * step + 7 + length]
    return needles


def duplex_transfer(
    topo: Topology,
    a_sends: int,
    b_sends: int,
    connections: int = 1,
    ipv6: bool = False,
    client_args: Sequence[str] = (),
    server_args: Sequence[str] = (),
    timeout: float = 120.0,
    port: int = DUPLEX_PORT,
) -> DuplexResult:
    """`connections` TCP connections from a to b; on each, a sends `a_sends` bytes while b sends
    `b_sends`. Checks both digests of every connection (`DuplexResult.problems`)."""
    from .duplex import expected_sha256

    address = (topo.addresses6 if ipv6 else topo.addresses)["b"]
    program = [sys.executable, "-m", "nfq_tcpcrypt.lab.duplex"]
    common = ["--connections", str(connections), "--timeout", str(min(timeout, 60.0))]
    server = start_ready(
        topo, "b", [*program, "serve", address, str(port), "--send", str(b_sends), *common, *server_args], "ready"
    )
    import json

    started = time.monotonic()
    try:
        client = topo.run(
            "a", [*program, "connect", address, str(port), "--send", str(a_sends), *common, *client_args],
            timeout=timeout, capture_output=True, text=True,
        )  # fmt: skip
        seconds = time.monotonic() - started
        out, err = server.communicate(timeout=30)
    finally:
        _terminate(server, 5.0)
    try:
        client_report = json.loads(client.stdout.strip().splitlines()[-1])
        server_report = json.loads(out.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise LabError(f"duplex failed: client {client.stdout[-500:]} {client.stderr[-1000:]} "
                       f"server {out[-500:]!r} {err[-1000:]!r}") from None  # fmt: skip
    problems = []
    want = {"client": expected_sha256("server", b_sends), "server": expected_sha256("client", a_sends)}
    for name, report in (("client", client_report), ("server", server_report)):
        for i, conn in enumerate(report["connections"]):
            if conn.get("sha256") != want[name] or conn.get("error"):
                problems.append(f"{name} connection {i}: {conn}")
    return DuplexResult(client_report, server_report, a_sends, b_sends, seconds, problems)
