"""NAT on the gateway itself (README: NAT on the gateway): MASQUERADE toward the internet and a DNAT
port forward to an inside server, with the link between the gateways encrypted and proven so by
`decode` with the key logs.

a - ga - gb - b (labnet `Topology(gateways=True)`), daemons in gateway mode on ga and gb, nothing on
a and b. The internet link knows only the gateways' own addresses: ga masquerades site A (source
ports moved into 40000-40100, so the port changes too); in the port-forward case gb also forwards
its public port 80 to b's server on 8080 and no route to site B exists either.
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Iterator
from pathlib import Path

import pytest

from nfq_tcpcrypt.lab.net import (
    HTTP_PORT,
    IFNAMES,
    Daemon,
    LabError,
    Topology,
    backend_args,
    capture,
    fetch,
    http_server,
    make_payload,
    sha256_file,
    shell_faults,
    start_daemon,
)
from nfq_tcpcrypt.tools.pcapcheck import analyze

from .conftest import lab_topology
from .decoded import decoded_connections

SIZE = 256 * 1024
FORWARDED_PORT = 80


@pytest.fixture
def sites() -> Iterator[Topology]:
    """a - ga - gb - b, always removed afterwards."""
    yield from lab_topology("nfqnat", gateways=True)


def _sessions(daemon: Daemon, port: int) -> list[dict[str, object]]:
    return [e for e in daemon.sessions() if any(str(e[end]).endswith(f":{port}") for end in ("local", "remote"))]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("ipv6", [False, True], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("shape", ["masquerade", "port-forward"])
def test_nat_on_the_gateway(sites: Topology, tmp_path: Path, ipv6: bool, shape: str) -> None:
    """Both queues see the post-NAT tuple: one session per connection, equal on both gateways."""
    sites.masquerade("ga", ipv6)
    if shape == "port-forward":
        sites.port_forward("gb", FORWARDED_PORT, "b", HTTP_PORT, ipv6)
        sites._site_only_behind("gb", ipv6)
        server, port = sites.public("gb", ipv6), FORWARDED_PORT
    else:
        server, port = (sites.addresses6 if ipv6 else sites.addresses)["b"], HTTP_PORT
    client_public = sites.public("ga", ipv6)
    www = tmp_path / "www"
    www.mkdir()
    markers = make_payload(www / "f.bin", SIZE)
    extra = ["--ipv6"] if ipv6 else []
    wire_pcap, inside_pcap = tmp_path / "wire.pcap", tmp_path / "inside.pcap"
    daemons = {side: start_daemon(sites, side, tmp_path, extra, mode="gateway") for side in ("ga", "gb")}
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(capture(sites, "ga", wire_pcap, ifname=sites.outside["ga"]))
            stack.enter_context(capture(sites, "a", inside_pcap, ifname=IFNAMES["a"]))
            stack.enter_context(http_server(sites, "b", www, ipv6=ipv6))
            host = f"[{server}]" if ipv6 else server
            fetch(sites, "a", f"http://{host}:{port}/f.bin", tmp_path / "got.bin", timeout=60)
        # Both gateways key the connection by its outside tuple: gb by its public port, not b's.
        tables = {side: _sessions(daemon, port) for side, daemon in daemons.items()}
        counters = {side: daemon.counters() for side, daemon in daemons.items()}
    finally:
        codes = {side: daemon.stop() for side, daemon in daemons.items()}
    logs = {side: Path(daemon.log).read_text()[-3000:] for side, daemon in daemons.items()}
    assert sha256_file(tmp_path / "got.bin") == sha256_file(www / "f.bin")
    assert codes == {"ga": 0, "gb": 0}, logs
    assert all(shell_faults(c) == {} for c in counters.values()), (counters, logs)

    # On the internet link: only public addresses, ENO, Init1/Init2, no plaintext.
    needles = {f"marker{i}": m for i, m in enumerate(markers)} | {"http-status-line": b"HTTP/1.0 200"}
    wire = analyze(wire_pcap, client_public, server, port, needles)
    assert wire.syn_has_eno and wire.synack_has_eno, "no ENO in the SYN or SYN-ACK on the internet link"
    assert wire.client_starts_with_init1 and wire.server_starts_with_init2
    assert wire.leaks == {} and len(wire.server_stream) > SIZE
    (conn,) = decoded_connections(wire_pcap, [Path(d.keylog).read_text() for d in daemons.values()], port)
    client_ip, client_port = conn.client.rsplit(":", 1)
    assert ipaddress.ip_address(client_ip.strip("[]")) == ipaddress.ip_address(client_public), conn.client
    assert 40000 <= int(client_port) <= 40100, conn.client  # MASQUERADE moved the port

    # Each gateway has one session for it, keyed by the same post-NAT tuple, with the same ID.
    (ga,), (gb,) = tables["ga"], tables["gb"]
    assert ga["session_id"] == gb["session_id"] == conn.session_id, (ga, gb, conn.session_id)
    assert ga["local"] == conn.client and ga["role"] == "A" and gb["role"] == "B", (ga, conn.client)
    assert gb["remote"] == conn.client and gb["local"] == conn.server, gb

    # Inside site A: the host's own addresses, plain TCP (it runs no daemon).
    inside = analyze(inside_pcap, (sites.addresses6 if ipv6 else sites.addresses)["a"], server, port, needles)
    assert not inside.syn_has_eno and "http-status-line" in inside.leaks
    for side in ("ga", "gb"):
        leftover = [line for tool in ("iptables-save", "ip6tables-save")
                    for line in sites.check(side, [tool]).splitlines() if "NFQ_TCPCRYPT" in line]  # fmt: skip
        assert leftover == [], (side, leftover)
        if "NFQ_TCPCRYPT" in sites.check(side, ["nft", "list", "ruleset"]):
            raise LabError(f"nft chain left in {side}")


@pytest.mark.timeout(60)
def test_gateway_without_nft_fails_cleanly(sites: Topology, tmp_path: Path) -> None:
    """Without the nft tool the iptables part goes in, the nft part cannot: the daemon says why,
    exits 1, and takes the iptables part out again."""
    import os
    import shutil
    import subprocess
    import sys

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("ip", "iptables", "iptables-restore", "iptables-save", "ip6tables", "ip6tables-restore",
                 "ip6tables-save", "sysctl"):  # fmt: skip
        found = shutil.which(tool)
        assert found is not None, tool
        (bin_dir / tool).symlink_to(found)
    env = {**os.environ, "PATH": str(bin_dir)}
    result = subprocess.run(
        ["ip", "netns", "exec", sites.names["ga"], sys.executable, "-m", "nfq_tcpcrypt", "run", "--mode", "gateway",
         "--outside", sites.outside["ga"], "--workers", "1", *backend_args(), "--control", str(tmp_path / "c.sock")],
        capture_output=True, text=True, timeout=40, env=env, check=False,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-2000:]
    assert "nft tool is missing" in result.stderr, result.stderr[-2000:]
    assert "NFQ_TCPCRYPT" not in sites.check("ga", ["iptables-save"])
    assert not (tmp_path / "c.sock").exists()
