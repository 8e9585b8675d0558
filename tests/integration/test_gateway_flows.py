"""Many concurrent connections through a gateway pair (README: Gateway mode): 64 curl transfers at
once from a to b through ga and gb (2 workers each), every one encrypted on the internet link,
verified by `decode` with the key logs, and digest-equal at the end."""

from __future__ import annotations

import contextlib
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from nfq_tcpcrypt.lab.net import (
    HTTP_PORT,
    Topology,
    capture,
    http_server,
    sha256_file,
    shell_faults,
    start_daemon,
)
from nfq_tcpcrypt.shell.dispatch import worker_of

from .conftest import lab_topology
from .decoded import decoded_connections

FLOWS = 64
SIZE = 96 * 1024


@pytest.fixture
def sites() -> Iterator[Topology]:
    """a - ga - gb - b, always removed afterwards."""
    yield from lab_topology("nfqflows", gateways=True)


def _parallel_fetch(sites: Topology, url: str, got: Path) -> subprocess.CompletedProcess[str]:
    argv = ["curl", "-sS", "--fail", "--parallel", "--parallel-immediate", "--parallel-max", str(FLOWS),
            "--max-time", "120"]  # fmt: skip
    for n in range(FLOWS):
        argv += ["-o", str(got / f"f{n}.bin"), f"{url}/f{n}.bin"]
    return sites.run("a", argv, timeout=180)


@pytest.mark.timeout(240)
def test_64_concurrent_flows(sites: Topology, tmp_path: Path) -> None:
    """64 connections open at once (curl --parallel): all digest-equal, all encrypted on the wire."""
    www, got = tmp_path / "www", tmp_path / "got"
    www.mkdir()
    got.mkdir()
    for n in range(FLOWS):
        (www / f"f{n}.bin").write_bytes(secrets.token_bytes(SIZE))
    pcap = tmp_path / "wire.pcap"
    daemons = {side: start_daemon(sites, side, tmp_path, ["--workers", "2"], mode="gateway") for side in ("ga", "gb")}
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(capture(sites, "ga", pcap, ifname=sites.outside["ga"]))
            # a listen backlog for all of them: with http.server's 5 the server's stack drops handshakes
            url = stack.enter_context(http_server(sites, "b", www, backlog=128))
            result = _parallel_fetch(sites, url, got)
            assert result.returncode == 0, result.stderr[-2000:]
        tables = {side: daemon.sessions() for side, daemon in daemons.items()}
        counters = {side: daemon.counters() for side, daemon in daemons.items()}
    finally:
        codes = {side: daemon.stop() for side, daemon in daemons.items()}
    logs = {side: Path(daemon.log).read_text()[-3000:] for side, daemon in daemons.items()}
    assert codes == {"ga": 0, "gb": 0}, logs
    assert all(shell_faults(c) == {} for c in counters.values()), (counters, logs)
    for n in range(FLOWS):
        assert sha256_file(got / f"f{n}.bin") == sha256_file(www / f"f{n}.bin"), n
    conns = decoded_connections(pcap, [Path(d.keylog).read_text() for d in daemons.values()], HTTP_PORT)
    assert len(conns) == FLOWS, [c.client for c in conns]
    assert all(d.plaintext_bytes > 0 for c in conns for d in c.directions)
    ids = {side: {e["session_id"] for e in table if str(e["remote"]).endswith(f":{HTTP_PORT}")
                  or str(e["local"]).endswith(f":{HTTP_PORT}")} for side, table in tables.items()}  # fmt: skip
    assert ids["ga"] == ids["gb"] == {c.session_id for c in conns}, ids
    assert len(ids["ga"]) == FLOWS
    # each connection whole on the worker its 4-tuple hashes to, on both gateways, and both used
    a, b = sites.addresses["a"], sites.addresses["b"]
    for side, table in tables.items():
        workers = set()
        for entry in table:
            client = str(entry["local"] if side == "ga" else entry["remote"])
            expected = worker_of(a, int(client.rsplit(":", 1)[1]), b, HTTP_PORT, 2)
            assert entry["worker"] == expected, (side, entry)
            workers.add(expected)
        assert workers == {0, 1}, side


@pytest.mark.timeout(240)
def test_64_flows_to_a_server_with_a_small_backlog(sites: Topology, tmp_path: Path) -> None:
    """A server whose listen queue overflows (http.server's backlog of 5, 64 connections at once)
    answers with SYN cookies and drops what completes the handshake while its accept queue is full
    (ListenOverflows); every transfer still completes. A pure ACK toward it must carry the first
    sequence number, or the cookie check fails and it resets the connection (plain TCP only waits):
    the translator gives it that number while its stack has acknowledged nothing, and the client's
    engine no longer repeats the acknowledgment of Init2 that the request's frame carries
    (Engine._drop_repeated_ack)."""
    www, got = tmp_path / "www", tmp_path / "got"
    www.mkdir()
    got.mkdir()
    for n in range(FLOWS):
        (www / f"f{n}.bin").write_bytes(secrets.token_bytes(SIZE))
    daemons = {side: start_daemon(sites, side, tmp_path, ["--workers", "1"], mode="gateway") for side in ("ga", "gb")}
    try:
        with http_server(sites, "b", www) as url:
            result = _parallel_fetch(sites, url, got)
    finally:
        for daemon in daemons.values():
            daemon.stop()
    assert result.returncode == 0, result.stderr[-2000:]
