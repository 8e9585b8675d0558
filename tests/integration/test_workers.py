"""`run --workers N` (README: Workers): both directions of a connection reach the same worker, the
connections spread over all workers by the symmetric 4-tuple hash (shell/dispatch.py), one control
socket answers for all of them, and a secret cached by one worker resumes a connection on another.

a - ga - gb - b, gateways on ga and gb, nothing on a and b. The client ports are chosen with
`dispatch.worker_of`, so which worker each connection must reach is known in advance.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nfq_tcpcrypt.lab.net import (
    HTTP_PORT,
    Daemon,
    Topology,
    capture,
    http_server,
    make_payload,
    sha256_file,
    shell_faults,
    start_daemon,
)
from nfq_tcpcrypt.shell.control import query
from nfq_tcpcrypt.shell.dispatch import worker_of
from nfq_tcpcrypt.shell.workers import worker_control_path
from nfq_tcpcrypt.tools.pcapcheck import analyze

from .conftest import lab_topology
from .decoded import decoded_connections

SIZE = 64 * 1024


@pytest.fixture
def sites() -> Iterator[Topology]:
    """a - ga - gb - b, always removed afterwards."""
    yield from lab_topology("nfqwork", gateways=True)


def _ports(
    topo: Topology, workers: int, per_worker: int, first: int = 42000, ipv6: bool = False
) -> list[tuple[int, int]]:
    """(client port, expected worker): `per_worker` ports for each worker, in turn."""
    addresses = topo.addresses6 if ipv6 else topo.addresses
    a, b = addresses["a"], addresses["b"]
    chosen: dict[int, list[int]] = {k: [] for k in range(workers)}
    port = first
    while any(len(ports) < per_worker for ports in chosen.values()):
        k = worker_of(a, port, b, HTTP_PORT, workers)
        if len(chosen[k]) < per_worker:
            chosen[k].append(port)
        port += 1
    return [(chosen[k][i], k) for i in range(per_worker) for k in range(workers)]


@contextlib.contextmanager
def _gateways(topo: Topology, tmp_path: Path, workers: int, ipv6: bool = False) -> Iterator[dict[str, Daemon]]:
    args = ["--workers", str(workers), *(["--ipv6"] if ipv6 else [])]
    daemons = {side: start_daemon(topo, side, tmp_path, args, mode="gateway") for side in ("ga", "gb")}
    try:
        yield daemons
    finally:
        codes = {side: daemon.stop() for side, daemon in daemons.items()}
        logs = {side: Path(d.log).read_text()[-3000:] for side, d in daemons.items()}
        assert codes == {"ga": 0, "gb": 0}, logs


def _fetch_from(topo: Topology, url: str, out: Path, port: int) -> None:
    result = topo.run("a", ["curl", "-sS", "--fail", "--max-time", "60", "--local-port", str(port),
                            "-o", str(out), url], timeout=90)  # fmt: skip
    assert result.returncode == 0, result.stderr


def _table(daemon: Daemon) -> dict[int, dict[str, object]]:
    """Client port -> the session of the HTTP connection from it."""
    out: dict[int, dict[str, object]] = {}
    for entry in daemon.sessions():
        ends = (str(entry["local"]), str(entry["remote"]))
        client = ends[0] if ends[1].endswith(f":{HTTP_PORT}") else ends[1]
        port = int(client.rsplit(":", 1)[1])
        assert port not in out, f"two sessions for one connection: {out.get(port)} {entry}"
        out[port] = entry
    return out


@pytest.mark.timeout(240)
@pytest.mark.parametrize("ipv6", [False, True], ids=["ipv4", "ipv6"])
def test_affinity_many_flows_between_two_hosts(sites: Topology, tmp_path: Path, ipv6: bool) -> None:
    """3 workers, 12 connections between the same two hosts: each one whole on its hashed worker."""
    workers = 3
    plan = _ports(sites, workers, per_worker=4, ipv6=ipv6)
    www = tmp_path / "www"
    www.mkdir()
    make_payload(www / "f.bin", SIZE)
    pcap = tmp_path / "wire.pcap"
    with _gateways(sites, tmp_path, workers, ipv6) as daemons:
        with capture(sites, "ga", pcap, ifname=sites.outside["ga"]), http_server(sites, "b", www, ipv6=ipv6) as url:
            for port, _ in plan:
                _fetch_from(sites, f"{url}/f.bin", tmp_path / f"got{port}", port)
        tables = {side: _table(daemon) for side, daemon in daemons.items()}
        counters = {side: daemon.counters() for side, daemon in daemons.items()}
        ping = query(daemons["ga"].control, "ping")
    assert ping["workers"] == workers
    for port, _ in plan:
        assert sha256_file(tmp_path / f"got{port}") == sha256_file(www / "f.bin"), port
    for side in ("ga", "gb"):
        assert shell_faults(counters[side]) == {}, counters[side]
        assert counters[side]["shell.workers"] == workers
        assert sorted(tables[side]) == sorted(port for port, _ in plan), tables[side].keys()
        for port, expected in plan:
            entry = tables[side][port]
            # whole on one worker: the one the hash names, both directions carried bytes, closed cleanly
            assert entry["worker"] == expected, (side, port, entry)
            assert entry["state"] == "closed" and entry["bytes_in"] and entry["bytes_out"], entry
        # every worker's own queues carried packets: each one bound and was chosen
        for k in range(workers):
            assert any(tables[side][port]["worker"] == k for port, _ in plan)
    conns = decoded_connections(pcap, [Path(d.keylog).read_text() for d in daemons.values()], HTTP_PORT)
    assert len(conns) == len(plan)
    ids = {int(c.client.rsplit(":", 1)[1]): c.session_id for c in conns}
    assert all(ids[port] == tables["ga"][port]["session_id"] == tables["gb"][port]["session_id"] for port, _ in plan)


@pytest.mark.timeout(180)
def test_resumption_across_workers(sites: Topology, tmp_path: Path) -> None:
    """A fresh session on worker 0 caches a secret in the supervisor; the next connection, on worker 1
    of both gateways, resumes from it (no Init messages, decode verifies it with the SS lines)."""
    (first, w0), (second, w1) = _ports(sites, 2, per_worker=1)
    assert (w0, w1) == (0, 1)
    www = tmp_path / "www"
    www.mkdir()
    make_payload(www / "f.bin", SIZE)
    pcaps = [tmp_path / "first.pcap", tmp_path / "second.pcap"]
    with _gateways(sites, tmp_path, 2) as daemons, http_server(sites, "b", www) as url:
        for port, pcap in zip((first, second), pcaps, strict=True):
            with capture(sites, "ga", pcap, ifname=sites.outside["ga"]):
                _fetch_from(sites, f"{url}/f.bin", tmp_path / f"got{port}", port)
        tables = {side: _table(daemon) for side, daemon in daemons.items()}
        cache = query(daemons["ga"].control, "cache")
        counters = {side: daemon.counters() for side, daemon in daemons.items()}
    keylogs = [Path(d.keylog).read_text() for d in daemons.values()]
    for side in ("ga", "gb"):
        assert tables[side][first]["worker"] == 0 and tables[side][first]["resumed"] is False, tables[side]
        assert tables[side][second]["worker"] == 1 and tables[side][second]["resumed"] is True, tables[side]
        assert counters[side]["shell.cache_remote_failed"] == 0
        assert counters[side]["supervisor.cache_store"] >= 1
    assert counters["ga"]["supervisor.cache_offer"] >= 2 and counters["gb"]["supervisor.cache_answer"] >= 1
    assert [entry["resumptions"] for entry in cache] == [1], cache
    assert "SS " in keylogs[0] and "SS " in keylogs[1]
    (fresh,) = decoded_connections(pcaps[0], keylogs, HTTP_PORT)
    (resumed,) = decoded_connections(pcaps[1], keylogs, HTTP_PORT)
    assert not fresh.resumed and fresh.init1 is not None
    assert resumed.resumed and resumed.init1 is None
    assert resumed.session_id == tables["ga"][second]["session_id"] == tables["gb"][second]["session_id"]
    for port in (first, second):
        assert sha256_file(tmp_path / f"got{port}") == sha256_file(www / "f.bin")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _worker_pids(daemon: Daemon) -> list[int]:
    children = Path(f"/proc/{daemon.proc.pid}/task/{daemon.proc.pid}/children").read_text().split()
    # the daemon runs under `ip netns exec`, which execs: its pid is the supervisor's
    return [int(pid) for pid in children]


@pytest.mark.timeout(120)
def test_a_dying_worker_stops_the_daemon_and_a_killed_supervisor_takes_its_workers(
    sites: Topology, tmp_path: Path
) -> None:
    """SIGKILL of one worker: the daemon exits 1 and leaves its rules (the worker's encrypted
    connections, if any, were not reset: they fail closed). SIGKILL of the supervisor:
    its workers go too (nothing left bound), and `rules remove` cleans up."""
    (tmp_path / "ga").mkdir()
    ga = start_daemon(sites, "ga", tmp_path / "ga", ["--workers", "2"], mode="gateway")
    workers = _worker_pids(ga)
    assert len(workers) == 2, workers
    os.kill(workers[1], signal.SIGKILL)
    assert ga.proc.wait(30) == 1, Path(ga.log).read_text()[-2000:]
    assert not any(_alive(pid) for pid in workers)
    log = Path(ga.log).read_text()
    assert "worker 1 exited" in log
    # The dead worker could not reset its encrypted connections: the rules stay (fail closed).
    assert "worker(s) 1 did not reset theirs" in log, log[-2000:]
    assert "NFQ_TCPCRYPT" in sites.check("ga", ["iptables-save"])
    removed = sites.run("ga", [sys.executable, "-m", "nfq_tcpcrypt", "rules", "remove", "--control", ga.control])
    assert removed.returncode == 0, removed.stderr
    rules = sites.check("ga", ["iptables-save"])
    assert "NFQ_TCPCRYPT" not in rules, rules

    (tmp_path / "gb").mkdir()
    gb = start_daemon(sites, "gb", tmp_path / "gb", ["--workers", "2"], mode="gateway")
    workers = _worker_pids(gb)
    gb.proc.send_signal(signal.SIGKILL)
    gb.proc.wait(10)
    deadline = time.monotonic() + 20
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in workers), "workers outlived their supervisor"
    removed = sites.run("gb", [sys.executable, "-m", "nfq_tcpcrypt", "rules", "remove", "--control", gb.control])
    assert removed.returncode == 0, removed.stderr
    assert "NFQ_TCPCRYPT" not in sites.check("gb", ["iptables-save"])


@pytest.mark.timeout(150)
def test_a_frozen_worker_keeps_the_rules_so_its_connection_fails_closed(sites: Topology, tmp_path: Path) -> None:
    """A worker that cannot reset its encrypted connections when the daemon stops (frozen here by
    SIGSTOP) makes the daemon leave its rules: it exits 1 and says why, and the connection's bytes
    never leave in plaintext afterwards, though b's stack goes on sending; `rules remove` cleans up."""
    a, b = sites.addresses["a"], sites.addresses["b"]
    port = next(p for p in range(43000, 44000) if worker_of(a, p, b, HTTP_PORT, 2) == 1)
    for side in ("ga", "gb"):
        (tmp_path / side).mkdir()
    ga = start_daemon(sites, "ga", tmp_path / "ga", mode="gateway")
    gb = start_daemon(sites, "gb", tmp_path / "gb", ["--workers", "2"], mode="gateway")
    served, got, pcap = tmp_path / "www", tmp_path / "got", tmp_path / "wire.pcap"
    served.mkdir()
    markers = make_payload(served / "f", 4 * 1024 * 1024, markers=4096)  # one in any 1 KB
    # A small receive buffer at a keeps most of the file in b while curl reads slowly: otherwise
    # it all (and b's FIN) can reach a's buffer at once and b has nothing left to send.
    sites.check("a", ["sysctl", "-q", "-w", "net.ipv4.tcp_rmem=4096 65536 131072"])
    with capture(sites, "ga", pcap, ifname=sites.outside["ga"]), http_server(sites, "b", served) as url:
        curl = sites.popen("a", ["curl", "-sS", "--local-port", str(port), "--limit-rate", "300k",
                                 "--max-time", "60", "-o", str(got), f"{url}/f"], stderr=subprocess.PIPE)  # fmt: skip
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (not got.exists() or got.stat().st_size < 300_000):
            time.sleep(0.2)
        assert got.exists() and got.stat().st_size >= 300_000
        table = query(gb.control, "sessions")
        ours = [e for e in table if f"{e['local']} {e['remote']} ".count(f":{port} ")]  # curl's connection
        assert [(e["state"], e["worker"]) for e in ours] == [("encrypting", 1)], table
        os.kill(_worker_pids(gb)[1], signal.SIGSTOP)
        gb.proc.send_signal(signal.SIGTERM)
        code = gb.proc.wait(60)
        time.sleep(2.0)  # b's stack keeps sending; the rules left in gb drop it
        curl.kill()
        curl.wait(10)
    log = Path(gb.log).read_text()
    assert code == 1, log[-2000:]
    assert "worker(s) 1 did not reset theirs" in log, log[-2000:]
    assert "NFQ_TCPCRYPT" in sites.check("gb", ["iptables-save"])
    report = analyze(pcap, a, b, HTTP_PORT, {f"marker{i}": m for i, m in enumerate(markers)})
    assert report.leaks == {}, report.leaks
    removed = sites.run("gb", [sys.executable, "-m", "nfq_tcpcrypt", "rules", "remove", "--control", gb.control])
    assert removed.returncode == 0, removed.stderr
    assert "NFQ_TCPCRYPT" not in sites.check("gb", ["iptables-save"])
    ga.stop()


@pytest.mark.timeout(120)
def test_host_mode_with_workers(topo: Topology, tmp_path: Path) -> None:
    """`--workers 2` in host mode: the same dispatch; the transfer is encrypted and verified."""
    from nfq_tcpcrypt.lab.net import http_transfer

    result = http_transfer(topo, tmp_path, size=256 * 1024,
                           daemon_args={side: ["--workers", "2"] for side in ("a", "b")})  # fmt: skip
    assert result.received_sha256 == result.sent_sha256
    assert result.wire.client_starts_with_init1 and result.wire.leaks == {}
    a, b = result.session_for("a"), result.session_for("b")
    assert a is not None and b is not None and a["session_id"] == b["session_id"]
    assert a["worker"] == b["worker"] == worker_of(topo.addresses["a"], int(a["local"].rsplit(":", 1)[1]),
                                                   topo.addresses["b"], HTTP_PORT, 2)  # fmt: skip
    assert all(d.proc.returncode == 0 for d in result.daemons.values())
    assert result.keylogs["a"].count("# nfq-tcpcrypt key log") == 1
    assert result.pcap is not None
    (conn,) = decoded_connections(result.pcap, result.keylogs.values(), HTTP_PORT)
    assert conn.session_id == a["session_id"]


def _cpus_allowed(pid: int) -> str:
    status = Path(f"/proc/{pid}/status").read_text()
    return next(line.split()[1] for line in status.splitlines() if line.startswith("Cpus_allowed_list:"))


@pytest.mark.timeout(120)
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_cpus_pin_each_worker_to_its_own(sites: Topology, tmp_path: Path) -> None:
    """`--cpus`, reversed on purpose: worker k runs on the k-th CPU listed, the supervisor on all of
    them, and traffic goes through as without it (README: CPU affinity)."""
    first, second = sorted(os.sched_getaffinity(0))[:2]
    www = tmp_path / "www"
    www.mkdir()
    make_payload(www / "f.bin", SIZE)
    (tmp_path / "ga").mkdir()
    ga = start_daemon(sites, "ga", tmp_path / "ga", ["--workers", "2", "--cpus", f"{second},{first}"], mode="gateway")
    gb = start_daemon(sites, "gb", tmp_path, ["--cpus", str(first)], mode="gateway")  # one per CPU listed
    try:
        pids = [query(worker_control_path(ga.control, k), "ping")["pid"] for k in range(2)]
        assert [_cpus_allowed(pid) for pid in pids] == [str(second), str(first)]
        assert _cpus_allowed(ga.proc.pid) == (f"{first}-{second}" if second == first + 1 else f"{first},{second}")
        assert query(gb.control, "ping").get("workers", 1) == 1
        assert _cpus_allowed(gb.proc.pid) == str(first)
        with http_server(sites, "b", www) as url:
            for port, _ in _ports(sites, 2, per_worker=1):
                _fetch_from(sites, f"{url}/f.bin", tmp_path / f"got{port}", port)
                assert sha256_file(tmp_path / f"got{port}") == sha256_file(www / "f.bin")
        tables = _table(ga)
        assert sorted(entry["worker"] for entry in tables.values()) == [0, 1]
        assert all(entry["state"] == "closed" and entry["session_id"] for entry in tables.values()), tables
    finally:
        codes = {side: daemon.stop() for side, daemon in (("ga", ga), ("gb", gb))}
    assert codes == {"ga": 0, "gb": 0}
