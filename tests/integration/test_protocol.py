"""Every TEP x AEAD pair, rekeying by volume, and a host firewall, end to end.

Real daemons in the two-namespace lab (`labnet`), started with the options under test on both ends;
`python3 -m http.server` in b, curl in a; a capture of a's veth checked with `tools.pcapcheck`.
The helpers here are also used by test_resumption.py.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from nfq_tcpcrypt.lab.net import (
    HTTP_PORT,
    KEYLOG_ES,
    Daemon,
    Topology,
    backend_args,
    capture,
    drop_on_wire,
    fetch,
    make_payload,
    segment_on_wire,
    sha256_file,
    shell_faults,
    start_daemon,
)
from nfq_tcpcrypt.tools.pcapcheck import WireReport, analyze

SMALL = 256 * 1024
TEP_IDS = {"x25519": 0x23, "x448": 0x24, "p256": 0x21, "p521": 0x22}
AEADS = ("aes128gcm", "aes256gcm", "chacha20poly1305")


# --- helpers (shared with test_resumption.py) --------------------------------------------------------


@contextlib.contextmanager
def daemons(
    topo: Topology, workdir: Path, args: Sequence[str] = (), only: dict[str, Sequence[str]] | None = None
) -> Iterator[dict[str, Daemon]]:
    """The daemon on both ends with `args` (plus `only[side]` on that side); stopped (SIGTERM) when the
    block ends, exit 0 checked."""
    running: dict[str, Daemon] = {}
    try:
        for side in ("a", "b"):
            extra = (only or {}).get(side, ())
            running[side] = start_daemon(topo, side, workdir, ["--log-level", "INFO", *args, *extra])
        yield running
    finally:
        codes = {side: daemon.stop() for side, daemon in running.items()}
    for side, code in codes.items():
        assert code == 0, Path(running[side].log).read_text()[-2000:]


@dataclass
class Served:
    """A random file served by http.server in b, and the markers to look for on the wire."""

    url: str
    path: Path
    markers: list[bytes]

    def needles(self) -> dict[str, bytes]:
        """Plaintext markers: chunks of the file and the HTTP status line."""
        found = {f"marker{i}": marker for i, marker in enumerate(self.markers)}
        found["http-status-line"] = b"HTTP/1.0 200"
        return found


@contextlib.contextmanager
def serving(topo: Topology, workdir: Path, size: int) -> Iterator[Served]:
    """http.server in b on its veth address, serving one random file of `size` bytes."""
    from nfq_tcpcrypt.lab.net import http_server

    www = workdir / "www"
    www.mkdir(exist_ok=True)
    path = www / "payload.bin"
    markers = make_payload(path, size)
    with http_server(topo, "b", www) as url:
        yield Served(f"{url}/payload.bin", path, markers)


@dataclass
class Fetched:
    """One captured curl fetch: the file received, the capture, and what the capture shows."""

    received: Path
    pcap: Path
    wire: WireReport
    dropped: int | None


def fetch_captured(
    topo: Topology, workdir: Path, served: Served, name: str, timeout: float = 60.0
) -> Fetched:
    """One TCP connection a -> b (curl) under its own capture of a's veth."""
    received = workdir / f"{name}.bin"
    pcap = workdir / f"{name}.pcap"
    with capture(topo, "a", pcap) as stats:
        fetch(topo, "a", served.url, received, timeout)
    wire = analyze(pcap, topo.addresses["a"], topo.addresses["b"], HTTP_PORT, served.needles())
    return Fetched(received, pcap, wire, stats.dropped)


def http_sessions(daemon: Daemon) -> list[dict[str, Any]]:
    """The daemon's sessions of connections to the HTTP port (`sessions --json`)."""
    port = f":{HTTP_PORT}"
    return [e for e in daemon.sessions() if str(e["local"]).endswith(port) or str(e["remote"]).endswith(port)]


def pair(running: dict[str, Daemon]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The one HTTP session of a and of b, checked to name the same connection."""
    a_table, b_table = http_sessions(running["a"]), http_sessions(running["b"])
    assert len(a_table) == 1 and len(b_table) == 1, (a_table, b_table)
    a, b = a_table[0], b_table[0]
    assert a["local"] == b["remote"] and a["remote"] == b["local"], (a, b)
    return a, b


def assert_encrypted_wire(fetched: Fetched) -> None:
    """RFC 8547 §4: ENO in SYN and SYN-ACK; RFC 8548 §4.3: Init1/Init2 first; no plaintext markers."""
    wire = fetched.wire
    assert fetched.dropped == 0, "tcpdump dropped packets: the capture proves nothing"
    assert wire.syn_has_eno, "no ENO option (kind 69) in the SYN"
    assert wire.synack_has_eno, "no ENO option (kind 69) in the SYN-ACK"
    assert wire.client_starts_with_init1, wire.client_stream[:8].hex()
    assert wire.server_starts_with_init2, wire.server_stream[:8].hex()
    assert wire.leaks == {}, f"plaintext on the wire: {wire.leaks}"


def assert_no_faults(running: dict[str, Daemon]) -> None:
    """No engine exceptions, truncated copies or failed injections in either daemon."""
    for daemon in running.values():
        assert shell_faults(daemon.counters()) == {}, Path(daemon.log).read_text()[-3000:]


# --- tests --------------------------------------------------------------------------------------------


@pytest.mark.timeout(90)
@pytest.mark.parametrize("aead", AEADS)
@pytest.mark.parametrize("tep", list(TEP_IDS))
def test_every_tep_and_aead(topo: Topology, tmp_path: Path, tep: str, aead: str) -> None:
    """RFC 8548 §3.2-§3.4: each TEP with each AEAD, offered alone on both ends, moves a file intact."""
    with daemons(topo, tmp_path, ["--tep", tep, "--aead", aead]) as running:
        with serving(topo, tmp_path, SMALL) as served:
            fetched = fetch_captured(topo, tmp_path, served, "fetch")
        a, b = pair(running)
        assert_no_faults(running)
    assert sha256_file(fetched.received) == sha256_file(served.path)
    assert_encrypted_wire(fetched)
    assert a["session_id"] == b["session_id"], (a, b)
    assert re.fullmatch(r"[0-9a-f]+", a["session_id"]), a
    assert int(a["session_id"][:2], 16) == TEP_IDS[tep], "session ID does not start with the TEP id"
    for entry in (a, b):
        assert (entry["tep"], entry["aead"], entry["resumed"]) == (tep, aead, False), entry
    for daemon in running.values():
        assert KEYLOG_ES.search(Path(daemon.keylog).read_text()), f"no ES line in {daemon.side}'s key log"


@pytest.mark.timeout(150)
def test_rekey_by_volume(topo: Topology, tmp_path: Path) -> None:
    """RFC 8548 §3.8: with --rekey-bytes 65536 on both ends, several generations in each direction."""
    size = 3 * 1024 * 1024
    with daemons(topo, tmp_path, ["--rekey-bytes", "65536"]) as running:
        with serving(topo, tmp_path, size) as served:
            fetched = fetch_captured(topo, tmp_path, served, "fetch", timeout=90)
        a, b = pair(running)
        assert_no_faults(running)
    assert sha256_file(fetched.received) == sha256_file(served.path)
    assert_encrypted_wire(fetched)
    assert a["session_id"] == b["session_id"]
    # b sends 3 MiB: about 48 generations; its peer answers every rekey (the mandatory answer), so
    # both directions advance. generation = [send, recv] as seen by each end.
    assert b["generation"][0] > 3 and a["generation"][1] > 3, (a, b)
    assert a["generation"][0] > 3 and b["generation"][1] > 3, (a, b)
    assert a["generation"] == list(reversed(b["generation"])), (a, b)
    assert b["rekeys"] > 3 and a["rekeys"] > 3, (a, b)


UFW_LIKE_INPUT = [
    ["-P", "INPUT", "DROP"],
    ["-A", "INPUT", "-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP"],
    ["-A", "INPUT", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"],
]


def _input_policy_drops(topo: Topology, side: str) -> int:
    text = topo.check(side, ["iptables", "-L", "INPUT", "-v", "-x", "-n"])
    found = re.search(r"policy DROP (\d+) packets", text)
    assert found, text
    return int(found.group(1))


@pytest.mark.timeout(150)
def test_host_firewall_accepting_only_established(topo: Topology, tmp_path: Path) -> None:
    """docs/architecture.md: packets injected toward our own stack are tracked as the plaintext connection.

    Both hosts get the core of the INPUT policy ufw installs (DROP; INVALID dropped; established and
    related accepted; on b, new connections to the HTTP port). Not ufw's `-i lo -j ACCEPT`: the
    packets we inject toward our own stack are routed over lo, so that rule would accept them
    whatever their conntrack state and hide the difference under test. 2 % wire loss in each direction makes the
    engine inject toward the local stack (segments released when a gap fills, ACKs). Were those
    packets NOTRACKed like the wire-bound ones, INPUT would see them UNTRACKED and drop them. The
    links segment what leaves the hosts (as a NIC does), so the loss hits MTU-sized packets.
    """
    for side in ("a", "b"):
        segment_on_wire(topo, side)
    for side in ("a", "b"):
        for rule in UFW_LIKE_INPUT:
            topo.check(side, ["iptables", *rule])
    topo.check("b", ["iptables", "-A", "INPUT", "-p", "tcp", "--dport", str(HTTP_PORT),
                     "-m", "conntrack", "--ctstate", "NEW", "-j", "ACCEPT"])  # fmt: skip
    size = 2 * 1024 * 1024
    with daemons(topo, tmp_path) as running:
        for side in ("a", "b"):
            drop_on_wire(topo, side, 0.02)
        with serving(topo, tmp_path, size) as served:
            fetched = fetch_captured(topo, tmp_path, served, "fetch", timeout=90)
        a, b = pair(running)
        counters = {side: daemon.counters() for side, daemon in running.items()}
        assert_no_faults(running)
    assert sha256_file(fetched.received) == sha256_file(served.path)
    assert fetched.wire.leaks == {}
    assert a["session_id"] == b["session_id"] and a["state"] in ("closed", "encrypting"), (a, b)
    injected_local = sum(c.get("shell.injected_local", 0) for c in counters.values())
    assert injected_local > 0, (
        f"nothing was injected toward a local stack: the test proves nothing {counters}"
    )
    for side in ("a", "b"):
        assert _input_policy_drops(topo, side) == 0, topo.check(side, ["iptables", "-L", "INPUT", "-v", "-n"])


@pytest.mark.timeout(90)
def test_config_file(topo: Topology, tmp_path: Path) -> None:
    """`run --config FILE`: TEP, AEAD and a no-resume policy from TOML; the command line still wins."""
    config = tmp_path / "nfq-tcpcrypt.toml"
    config.write_text(
        'tep = ["p256", "x25519"]\n'
        'aead = "aes128gcm"\n'
        "rekey-bytes = 0\n"
        "[[policy]]\n"
        f"port = {HTTP_PORT}\n"
        "no_resume = true\n"
    )
    with daemons(topo, tmp_path, ["--config", str(config), "--aead", "aes256gcm"]) as running:
        with serving(topo, tmp_path, SMALL) as served:
            fetched = [fetch_captured(topo, tmp_path, served, f"f{i}") for i in range(2)]
        tables = {side: http_sessions(daemon) for side, daemon in running.items()}
        assert_no_faults(running)
    for one in fetched:
        assert_encrypted_wire(one)  # the policy: both connections fresh, never resumed
        assert sha256_file(one.received) == sha256_file(served.path)
    for table in tables.values():
        assert len(table) == 2
        assert {(e["tep"], e["aead"], e["resumed"]) for e in table} == {("p256", "aes256gcm", False)}, table


@pytest.mark.timeout(30)
def test_config_file_errors_stop_the_start(topo: Topology, tmp_path: Path) -> None:
    """An unknown key is a clear error and the daemon installs nothing."""
    import sys

    config = tmp_path / "bad.toml"
    config.write_text("rekey-byte = 5\n")
    result = topo.run(
        "a",
        [
            sys.executable,
            "-m",
            "nfq_tcpcrypt",
            "run",
            *backend_args(),
            "--config",
            str(config),
            "--control",
            str(tmp_path / "c"),
        ],
        timeout=20,
    )
    assert result.returncode == 2
    assert "unknown key 'rekey-byte'" in result.stderr, result.stderr
    assert "NFQ_TCPCRYPT" not in topo.check("a", ["iptables-save"])
