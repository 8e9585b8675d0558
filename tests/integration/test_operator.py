"""What an operator sees and does (README: Status and metrics): `status [--json]`, `metrics` and the
metrics file, SIGHUP reloading the config without dropping a connection."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nfq_tcpcrypt import build
from nfq_tcpcrypt.lab.net import (
    HTTP_PORT,
    Daemon,
    Topology,
    fetch,
    http_server,
    make_payload,
    sha256_file,
    start_daemon,
)

from .conftest import lab_topology


@pytest.fixture
def sites() -> Iterator[Topology]:
    """a - ga - gb - b, always removed afterwards."""
    yield from lab_topology("nfqops", gateways=True)


def _cli(daemon: Daemon, *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "nfq_tcpcrypt", *args, "--control", daemon.control],
                            capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


def _samples(text: str) -> dict[str, float]:
    """`name{labels}` -> value of every sample line; each line must be well-formed."""
    out = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.fullmatch(r"# (HELP|TYPE) nfq_tcpcrypt_\w+ .+", line), line
            continue
        match = re.fullmatch(r'(nfq_tcpcrypt_\w+(?:\{(?:\w+="(?:[^"\\]|\\.)*",?)*\})?) (\d+(?:\.\d+)?)', line)
        assert match, line
        out[match.group(1)] = float(match.group(2))
    return out


@pytest.mark.timeout(120)
def test_status_metrics_and_reload_on_a_gateway(sites: Topology, tmp_path: Path) -> None:
    """2 workers on ga with a metrics file: after one transfer, status and metrics say so; SIGHUP
    reaches both workers."""
    www = tmp_path / "www"
    www.mkdir()
    make_payload(www / "f.bin", 64 * 1024)
    prom = tmp_path / "nfq.prom"
    ga = start_daemon(sites, "ga", tmp_path, ["--workers", "2", "--metrics-file", str(prom)], mode="gateway")
    gb = start_daemon(sites, "gb", tmp_path, ["--workers", "1"], mode="gateway")
    try:
        with http_server(sites, "b", www) as url:
            fetch(sites, "a", f"{url}/f.bin", tmp_path / "got.bin")
        doc = json.loads(_cli(ga, "status", "--json"))
        text = _cli(ga, "status")
        exposition = _cli(ga, "metrics")
        doc_b = json.loads(_cli(gb, "status", "--json"))
        ga.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while ga.counters().get("shell.reloads", 0) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        reloads = ga.counters().get("shell.reloads")
        deadline = time.monotonic() + 20
        while not prom.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        textfile = prom.read_text()
    finally:
        codes = [ga.stop(), gb.stop()]
    assert codes == [0, 0], Path(ga.log).read_text()[-3000:]
    assert sha256_file(tmp_path / "got.bin") == sha256_file(www / "f.bin")
    assert reloads == 2  # SIGHUP passed on to both workers

    assert doc["mode"] == "gateway" and doc["workers"] == 2 and doc["version"] and doc["build"] == build()
    assert doc["queues"] == [7100, 7101, 7102, 7103]
    assert any("nft add chain ip mangle NFQ_TCPCRYPT_SNAT_7100" in line for line in doc["rules"]), doc["rules"]
    assert sum("NFQUEUE" in line and "_ENCQ_" not in line for line in doc["rules"]) == 4, doc["rules"]
    assert sum("NFQUEUE" in line and "_ENCQ_" in line for line in doc["rules"]) == 2, doc["rules"]
    assert doc["handshakes"] == {"fresh": 1, "resumed": 0}, doc
    assert doc["fallbacks"] == {} and doc["aborts"] == {} and doc["tag_failures"] == 0
    assert doc["kernel_queue_drops"] == 0 and doc["cache_entries"] == 1
    assert doc_b["workers"] == 1 and doc_b["handshakes"] == {"fresh": 1, "resumed": 0}, doc_b
    assert "gateway mode" in text and "2 worker(s)" in text and "handshakes: 1 fresh, 0 resumed" in text

    samples = _samples(exposition)
    assert samples['nfq_tcpcrypt_connections_total{outcome="encrypted"}'] == 1
    assert samples['nfq_tcpcrypt_connections_total{outcome="plain_fallback"}'] == 0
    assert samples["nfq_tcpcrypt_workers"] == 2 and samples["nfq_tcpcrypt_tag_failures_total"] == 0
    assert samples['nfq_tcpcrypt_kernel_queue_drops_total{queue="7102",kind="queue_dropped"}'] == 0
    assert set(_samples(textfile)) >= {"nfq_tcpcrypt_workers", 'nfq_tcpcrypt_handshakes_total{kind="fresh"}'}
    assert oct(prom.stat().st_mode & 0o777) == "0o644"


@pytest.mark.timeout(120)
def test_plain_fallback_is_counted(routed: Topology, tmp_path: Path) -> None:
    """A gateway on r, b without a daemon: the connection stays plain and metrics count it so."""
    www = tmp_path / "www"
    www.mkdir()
    make_payload(www / "f.bin", 32 * 1024)
    r = start_daemon(routed, "r", tmp_path, ["--workers", "1"], mode="gateway")
    try:
        with http_server(routed, "b", www) as url:
            fetch(routed, "a", f"{url}/f.bin", tmp_path / "got.bin")
        doc = json.loads(_cli(r, "status", "--json"))
        samples = _samples(_cli(r, "metrics"))
    finally:
        assert r.stop() == 0
    assert doc["handshakes"] == {"fresh": 0, "resumed": 0}
    assert sum(doc["fallbacks"].values()) == 1, doc["fallbacks"]
    assert samples['nfq_tcpcrypt_connections_total{outcome="plain_fallback"}'] == 1
    assert samples['nfq_tcpcrypt_connections_total{outcome="encrypted"}'] == 0


@pytest.mark.timeout(120)
def test_sighup_reloads_without_dropping_connections(topo: Topology, tmp_path: Path) -> None:
    """a runs with --config; during a slow transfer the file changes its TEP list and a gets SIGHUP:
    the transfer finishes intact, and the next connection uses the new TEP."""
    config = tmp_path / "a.toml"
    config.write_text('tep = "x25519"\n')
    www = tmp_path / "www"
    www.mkdir()
    make_payload(www / "f.bin", 512 * 1024)
    a = start_daemon(topo, "a", tmp_path, ["--config", str(config)])
    b = start_daemon(topo, "b", tmp_path, ["--tep", "x25519,p256"])
    try:
        with http_server(topo, "b", www) as url:
            slow = topo.popen("a", ["curl", "-sS", "--fail", "--limit-rate", "128k", "-o",
                                    str(tmp_path / "slow.bin"), f"{url}/f.bin"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
            time.sleep(1.0)
            assert slow.poll() is None, "the slow transfer ended before the reload"
            config.write_text('tep = "p256"\n')
            a.proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 20
            while a.counters().get("shell.reloads", 0) < 1 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert slow.poll() is None, "the slow transfer ended before the reload was done"
            waiter = threading.Thread(target=slow.wait, args=(60,))
            waiter.start()
            fetch(topo, "a", f"{url}/f.bin", tmp_path / "after.bin")
            waiter.join()
            assert slow.returncode == 0, slow.stderr.read() if slow.stderr else ""
        sessions = {str(e["local"]).rsplit(":", 1)[1]: e for e in a.sessions()
                    if str(e["remote"]).endswith(f":{HTTP_PORT}")}  # fmt: skip
        counters = a.counters()
    finally:
        codes = [a.stop(), b.stop()]
    assert codes == [0, 0], Path(a.log).read_text()[-3000:]
    assert counters["shell.reloads"] == 1 and counters["shell.reload_failed"] == 0
    for name in ("slow.bin", "after.bin"):
        assert sha256_file(tmp_path / name) == sha256_file(www / "f.bin"), name
    teps = sorted(e["tep"] for e in sessions.values())
    assert teps == ["p256", "x25519"], sessions  # the first kept x25519; the one after the reload is p256
    assert all(e["state"] == "closed" for e in sessions.values()), sessions
