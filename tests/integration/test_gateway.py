"""Gateway mode end to end: unmodified hosts behind gateways, real kernels and programs (README: Gateway mode).

Three shapes from labnet:
- `Topology(gateways=True)`: a - ga - gb - b. Gateways on ga and gb (`--outside` = the link between
  them, the "internet"); a and b run no daemon at all. With `internet_routers=2`,
  a - ga - i1 - i2 - gb - b (a bottleneck that neither gateway is attached to).
- `Topology(router=True)`: a - r - b. A gateway on r, and a host-mode daemon (or nothing) on the far
  host: a gateway interoperates with a host-mode daemon, and falls back to plain TCP with a peer that
  does not speak TCP-ENO.

Every transfer is small (256 KiB to 1 MiB): these tests prove the plumbing, test_network.py the
behaviour of the engine under stress.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nfq_tcpcrypt.lab.net import (
    HTTP_PORT,
    IFNAMES,
    ROUTER_ADDRESSES,
    ROUTER_IFNAMES,
    Topology,
    TransferResult,
    backend_args,
    capture,
    fetch,
    http_server,
    http_transfer,
    make_payload,
    rule_packets,
    sha256_file,
    shell_faults,
    start_daemon,
    start_ready,
)
from nfq_tcpcrypt.tools.pcapcheck import analyze

from .conftest import lab_topology

SIZE = 256 * 1024
INIT1, INIT2 = "15101a0e", "097105e0"


@pytest.fixture
def sites() -> Iterator[Topology]:
    """a - ga - gb - b, always removed afterwards (same skip rules as `topo`)."""
    yield from lab_topology("nfqgw", gateways=True)


def _all_rules(topo: Topology, side: str) -> list[str]:
    """Lines of iptables-save and ip6tables-save in `side` naming our chains or NFQUEUE, and the nft
    ruleset's lines naming our base chains (the gateway's chain after source NAT)."""
    lines = []
    for tool in ("iptables-save", "ip6tables-save"):
        text = topo.check(side, [tool])
        lines += [line for line in text.splitlines() if "NFQ_TCPCRYPT" in line or "NFQUEUE" in line]
    inside_chain = False
    for line in topo.check(side, ["nft", "list", "ruleset"]).splitlines():
        inside_chain = inside_chain or "chain NFQ_TCPCRYPT_SNAT" in line
        if inside_chain:
            lines.append(f"nft: {line.strip()}")
            inside_chain = line.strip() != "}"
    return lines


def _assert_clean(topo: Topology, result: TransferResult) -> None:
    """Every daemon exited 0 on SIGTERM, counted no shell fault and left no rule behind."""
    for side, daemon in result.daemons.items():
        text = Path(daemon.log).read_text()[-3000:]
        assert daemon.proc.returncode == 0, f"daemon {side} exit {daemon.proc.returncode}: {text}"
        assert shell_faults(result.counters[side]) == {}, text
        assert _all_rules(topo, side) == [], side


def _assert_encrypted(result: TransferResult, sides: tuple[str, str], loss: bool = False) -> None:
    """Digests equal; on the wire ENO in SYN and SYN-ACK, Init1/Init2 first, no plaintext; equal session IDs."""
    wire = result.wire
    assert result.received_sha256 == result.sent_sha256
    assert result.capture is not None and result.capture.dropped == 0, result.capture
    assert wire.syn_has_eno, "no ENO option (kind 69) in the SYN on the wire"
    if not loss:  # a retransmitted SYN-ACK may lack it (test_network.py)
        assert wire.synack_has_eno, "no ENO option (kind 69) in the SYN-ACK on the wire"
    assert wire.client_stream[:4].hex() == INIT1, "A->B stream does not start with Init1"
    assert wire.server_stream[:4].hex() == INIT2, "B->A stream does not start with Init2"
    assert wire.leaks == {}, f"plaintext on the wire: {wire.leaks}"
    assert len(wire.server_stream) > SIZE
    first, second = (result.session_for(side) for side in sides)
    assert first is not None and second is not None, result.sessions
    assert re.fullmatch(r"[0-9a-f]{66}", first["session_id"]), first
    assert first["session_id"] == second["session_id"]
    assert first["local"] == second["remote"] and first["remote"] == second["local"]
    assert {first["role"], second["role"]} == {"A", "B"}


def _assert_plain_inside(result: TransferResult, client_inside: bool = True) -> None:
    """The inside link carries the hosts' own plaintext TCP: no ENO from the host, no Init messages.

    The inside host's own handshake segment must carry no ENO; the gateway removes the peer's
    option from the one it forwards from the wire.
    """
    inside = result.inside_wire
    assert inside is not None
    own_eno = inside.syn_has_eno if client_inside else inside.synack_has_eno
    assert not own_eno, "the inside host's SYN or SYN-ACK carries ENO: it is not an unmodified host"
    assert inside.client_stream[:4].hex() not in (INIT1, INIT2)
    assert inside.server_stream[:4].hex() not in (INIT1, INIT2)
    assert "http-status-line" in inside.leaks and any(name.startswith("marker") for name in inside.leaks)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("ipv6", [False, True], ids=["ipv4", "ipv6"])
def test_gateway_to_gateway(sites: Topology, tmp_path: Path, ipv6: bool) -> None:
    """Two sites: hosts without any daemon, encrypted between the gateways, plaintext inside."""
    result = http_transfer(
        sites,
        tmp_path,
        size=SIZE,
        ipv6=ipv6,
        daemon_sides=("ga", "gb"),
        gateway_sides=("ga", "gb"),
        capture_at=("ga", sites.outside["ga"]),
        inside_capture_at=("a", IFNAMES["a"]),
    )
    _assert_encrypted(result, ("ga", "gb"))
    _assert_plain_inside(result)
    ga = result.session_for("ga")
    assert ga is not None and ga["role"] == "A" and ga["tep"] == "x25519" and ga["aead"] == "aes128gcm"
    addresses = sites.addresses6 if ipv6 else sites.addresses
    # "local" is the inside end: the hosts, not the gateways.
    assert ga["local"].startswith(f"[{addresses['a']}]" if ipv6 else f"{addresses['a']}:"), ga
    assert ga["remote"].endswith(f":{HTTP_PORT}"), ga
    _assert_clean(sites, result)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("gateway_site", ["client", "server"])
def test_gateway_to_host_daemon(routed: Topology, tmp_path: Path, gateway_site: str) -> None:
    """A gateway on r and a host-mode daemon on the far host: the same wire protocol, either role."""
    if gateway_site == "client":  # a (client) behind r; b (server) runs the host-mode daemon
        host, inside_host, outside_if = "b", "a", ROUTER_IFNAMES["b"]
    else:  # b (server) behind r; a (client) runs the host-mode daemon
        host, inside_host, outside_if = "a", "b", ROUTER_IFNAMES["a"]
    routed.outside["r"] = outside_if
    result = http_transfer(
        routed,
        tmp_path,
        size=SIZE,
        daemon_sides=("r", host),
        gateway_sides=("r",),
        capture_at=(host, IFNAMES[host]),
        inside_capture_at=(inside_host, IFNAMES[inside_host]),
    )
    _assert_encrypted(result, ("r", host))
    _assert_plain_inside(result, client_inside=gateway_site == "client")
    assert result.session_for("r")["role"] == ("A" if gateway_site == "client" else "B")
    _assert_clean(routed, result)


@pytest.mark.timeout(90)
def test_host_behind_gateway_to_plain_peer(routed: Topology, tmp_path: Path) -> None:
    """RFC 8547 §4.6 through a gateway: the far host has no daemon, the connection is plain and works."""
    result = http_transfer(
        routed,
        tmp_path,
        size=SIZE,
        daemon_sides=("r",),
        gateway_sides=("r",),
        capture_at=("b", IFNAMES["b"]),
    )
    wire = result.wire
    assert result.received_sha256 == result.sent_sha256
    assert wire.syn_has_eno, "the gateway did not offer ENO in the SYN"
    assert not wire.synack_has_eno
    assert not wire.client_starts_with_init1 and not wire.server_starts_with_init2
    # The checks that prove encryption elsewhere must see plaintext here, or they prove nothing.
    assert "http-status-line" in wire.leaks and any(name.startswith("marker") for name in wire.leaks)
    entry = result.session_for("r")
    assert entry is None or entry["tep"] in (None, ""), entry
    _assert_clean(routed, result)


@pytest.mark.timeout(90)
def test_gateways_own_connection_is_encrypted(routed: Topology, tmp_path: Path) -> None:
    """The gateway's own connections over its outside interface cross the same hooks: encrypted too."""
    served = tmp_path / "www"
    served.mkdir()
    markers = make_payload(served / "payload.bin", SIZE)
    gateway = start_daemon(routed, "r", tmp_path, mode="gateway")
    host = start_daemon(routed, "b", tmp_path)
    pcap = tmp_path / "wire.pcap"
    try:
        with capture(routed, "b", pcap), http_server(routed, "b", served) as url:
            fetch(routed, "r", f"{url}/payload.bin", tmp_path / "received.bin")
        sessions = {"r": gateway.sessions(), "b": host.sessions()}
        counters = {"r": gateway.counters(), "b": host.counters()}
    finally:
        codes = (gateway.stop(), host.stop())
    assert codes == (0, 0), Path(gateway.log).read_text()[-2000:]
    assert sha256_file(tmp_path / "received.bin") == sha256_file(served / "payload.bin")
    router_address = ROUTER_ADDRESSES["b"]
    needles = {f"marker{i}": marker for i, marker in enumerate(markers)}
    wire = analyze(pcap, router_address, routed.addresses["b"], HTTP_PORT, needles)
    assert wire.syn_has_eno and wire.synack_has_eno
    assert wire.client_stream[:4].hex() == INIT1 and wire.server_stream[:4].hex() == INIT2
    assert wire.leaks == {}
    (mine,) = [entry for entry in sessions["r"] if entry["remote"].endswith(f":{HTTP_PORT}")]
    (theirs,) = [entry for entry in sessions["b"] if entry["local"].endswith(f":{HTTP_PORT}")]
    assert mine["local"].startswith(f"{router_address}:") and mine["role"] == "A"
    assert mine["session_id"] == theirs["session_id"]
    for side in ("r", "b"):
        assert shell_faults(counters[side]) == {}
        assert _all_rules(routed, side) == []


@pytest.mark.timeout(90)
@pytest.mark.parametrize("fail_closed", [False, True], ids=["fail-open", "fail-closed"])
def test_sigterm_removes_gateway_rules(sites: Topology, tmp_path: Path, fail_closed: bool) -> None:
    """The gateway's rules match the outside interface only, and are removed exactly on SIGTERM."""
    assert _all_rules(sites, "ga") == []
    extra = ["--ipv6", "--workers", "2"] + (["--fail-closed"] if fail_closed else [])
    daemon = start_daemon(sites, "ga", tmp_path, extra, mode="gateway")
    lines = _all_rules(sites, "ga")
    outside = sites.outside["ga"]
    queue_rules = [line for line in lines if "NFQUEUE" in line]
    # inbound, outbound and encrypted outbound, IPv4 and IPv6, for each of 2 workers
    assert len(queue_rules) == 12, lines
    # worker 0 by the 4-tuple hash (a BPF match), worker 1 the rest; queues 7100..7103
    assert sum("-m bpf --bytecode" in line for line in queue_rules) == 6, queue_rules
    for queue, count in ((7100, 2), (7101, 4), (7102, 2), (7103, 4)):
        assert sum(f"--queue-num {queue}" in line for line in queue_rules) == count, queue_rules
    assert all(("--queue-bypass" in line) != (fail_closed or "ENCQ" in line) for line in queue_rules), queue_rules
    assert sum(f"-i {outside} -p tcp -j NFQ_TCPCRYPT_INQ" in line for line in lines) == 2, lines
    assert sum(f"-o {outside} -p tcp -j NFQ_TCPCRYPT_OUTQ" in line for line in lines) == 2, lines
    assert sum(f"-o {outside} -p tcp" in line and "TCPMSS --clamp-mss-to-pmtu" in line for line in lines) == 2
    assert not any(f" {sites.inside['ga']} " in line for line in lines), lines
    assert sum("--notrack" in line for line in lines) == 2, lines
    # after source NAT: one nft base chain per family at srcnat + 10, jumping to the rules
    assert sum("chain NFQ_TCPCRYPT_SNAT_7100" in line for line in lines) == 2, lines
    assert sum("priority srcnat + 10" in line for line in lines) == 2, lines
    assert sum("jump NFQ_TCPCRYPT_POST_7100" in line for line in lines) == 2, lines

    assert daemon.stop(timeout=20) == 0, Path(daemon.log).read_text()[-2000:]
    assert _all_rules(sites, "ga") == []
    assert not os.path.exists(daemon.control)


@pytest.mark.timeout(90)
def test_rules_remove_after_sigkill_gateway(sites: Topology, tmp_path: Path) -> None:
    """A SIGKILLed gateway leaves its chains; `rules remove` takes them away like a host daemon's."""
    daemon = start_daemon(sites, "ga", tmp_path, ["--ipv6"], mode="gateway")
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait(10)
    assert sum("chain NFQ_TCPCRYPT_SNAT" in line for line in _all_rules(sites, "ga")) == 2
    shown = sites.check("ga", [sys.executable, "-m", "nfq_tcpcrypt", "rules", "show"])
    assert "nft base chain ip mangle NFQ_TCPCRYPT_SNAT_7100" in shown, shown
    assert "nft base chain ip6 mangle NFQ_TCPCRYPT_SNAT_7100" in shown, shown
    removed = sites.run(
        "ga", [sys.executable, "-m", "nfq_tcpcrypt", "rules", "remove", "--control", daemon.control], timeout=30
    )
    assert removed.returncode == 0, removed.stderr
    assert _all_rules(sites, "ga") == []


def _between_gateways(
    topo: Topology, tmp_path: Path, capture_side: str, loss: float = 0.0, ipv6: bool = False, workers: int | None = None
) -> TransferResult:
    """1 MiB between the unmodified hosts of two sites, gateways on both sides, optionally with
    random loss on the link between the gateways; checked encrypted and clean."""
    lossy = {"wire_loss": loss, "loss_sides": ("ga", "gb")} if loss else {}
    result = http_transfer(
        topo,
        tmp_path,
        size=4 * SIZE,
        ipv6=ipv6,
        daemon_sides=("ga", "gb"),
        gateway_sides=("ga", "gb"),
        capture_at=(capture_side, topo.outside[capture_side]),
        timeout=60 if loss else 30,
        daemon_args={side: ["--workers", str(workers)] for side in ("ga", "gb")} if workers else None,
        **lossy,
    )
    _assert_encrypted(result, ("ga", "gb"), loss=bool(loss))
    _assert_clean(topo, result)
    return result


@pytest.mark.timeout(120)
@pytest.mark.parametrize("inside_mtu", [1500, 1400])
def test_gateway_to_gateway_with_loss(sites: Topology, tmp_path: Path, inside_mtu: int) -> None:
    """2 % random loss on the link between the gateways (both directions): the digests still match.

    With a 1400-byte MTU on a's inside link, the plaintext ga hands toward a after a gap fills must
    be cut to that link (deliver-max from the inside MTU): no forwarded packet is too big for it.
    (With `--deliver-max 32768` this transfer stalls: ga drops what does not fit and reports it.)
    """
    if inside_mtu != 1500:
        sites.set_mtu("a", IFNAMES["a"], inside_mtu)
        sites.set_mtu("ga", sites.inside["ga"], inside_mtu)
    for side in ("ga", "gb"):  # counts what the gateway's kernel refuses to forward for size
        sites.check(side, ["iptables", "-I", "OUTPUT", "-p", "icmp", "--icmp-type", "fragmentation-needed"])
    result = _between_gateways(sites, tmp_path, capture_side="gb", loss=0.02)
    for side in ("ga", "gb"):
        assert rule_packets(sites, side, "filter", "OUTPUT", "--icmp-type 3/4") == 0, side
    if inside_mtu != 1500:
        assert "deliver-max 1340" in Path(result.daemons["ga"].log).read_text()


@pytest.mark.timeout(90)
def test_stateful_firewall_on_the_gateways(sites: Topology, tmp_path: Path) -> None:
    """docs/architecture.md on a router: FORWARD policy DROP, INVALID dropped, ESTABLISHED accepted, at 2 % loss.

    The gateway's conntrack sees only plaintext (decrypted before it, encrypted after it), and the
    plaintext the engine injects toward the inside host is tracked, so nothing is INVALID.
    """
    for gateway in ("ga", "gb"):
        for rule in (
            ["-P", "FORWARD", "DROP"],
            ["-A", "FORWARD", "-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP"],
            ["-A", "FORWARD", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"],
            ["-A", "FORWARD", "-i", sites.inside[gateway], "-j", "ACCEPT"],
            ["-A", "FORWARD", "-i", sites.outside[gateway], "-p", "tcp", "--dport", str(HTTP_PORT),
             "-m", "conntrack", "--ctstate", "NEW", "-j", "ACCEPT"],
        ):  # fmt: skip
            sites.check(gateway, ["iptables", *rule])
    _between_gateways(sites, tmp_path, capture_side="ga", loss=0.02)
    for gateway in ("ga", "gb"):
        assert rule_packets(sites, gateway, "filter", "FORWARD", "INVALID") == 0, gateway


@pytest.mark.timeout(90)
def test_smaller_outside_mtu(sites: Topology, tmp_path: Path) -> None:
    """An internet link with a smaller MTU (1400) than the sites (1500), as behind PPPoE.

    The gateways clamp the MSS of SYNs leaving through the outside interface to its MTU (the
    engine takes the frame overhead off at the far end). Without that rule the connection stalls:
    the gateway's kernel tells the inside host the plaintext limit, and encryption adds 20 bytes again.
    """
    for side in ("ga", "gb"):
        sites.set_mtu(side, sites.outside[side], 1400)
        sites.check(side, ["iptables", "-I", "OUTPUT", "-p", "icmp", "--icmp-type", "fragmentation-needed"])
    _between_gateways(sites, tmp_path, capture_side="ga")
    for side in ("ga", "gb"):
        assert rule_packets(sites, side, "filter", "OUTPUT", "--icmp-type 3/4") == 0, side


@pytest.fixture
def far_sites() -> Iterator[Topology]:
    """a - ga - i1 - i2 - gb - b: two routers on the internet between the gateways."""
    yield from lab_topology("nfqgi", gateways=True, internet_routers=2)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("ipv6", [False, True], ids=["ipv4", "ipv6"])
def test_path_mtu_beyond_the_gateways(far_sites: Topology, tmp_path: Path, ipv6: bool) -> None:
    """A 1400-byte link in the middle of the internet, adjacent to neither gateway: no MSS clamp can
    know it, so the routers' too-big reports must reach the engine (MTU - 20 and the quoted sequence
    number, toward the inside host) as in host mode."""
    for side, ifname in far_sites.internet_links[1]:
        far_sites.set_mtu(side, ifname, 1400)
    # 3 workers: the reports must reach the worker of their connection (hashed on the quoted TCP
    # header), or b never learns the smaller MTU and the transfer stalls.
    result = _between_gateways(far_sites, tmp_path, capture_side="gb", ipv6=ipv6, workers=3)
    # b's data toward a met the small link: gb rewrote the routers' reports for b.
    assert result.counters["gb"].get("icmp_rewritten", 0) > 0, result.counters["gb"]


@pytest.mark.timeout(60)
def test_gateway_refuses_unknown_interface(sites: Topology, tmp_path: Path) -> None:
    """A missing or unknown outside interface is a configuration error (exit 2), nothing installed."""
    base = [sys.executable, "-m", "nfq_tcpcrypt", "run", *backend_args(), "--control", str(tmp_path / "c.sock")]
    for args, message in (
        (["--mode", "gateway"], "needs --outside"),
        (["--mode", "gateway", "--outside", "veth-nosuch"], "'veth-nosuch' does not exist"),
        (["--mode", "gateway", "--outside", f"{sites.outside['ga']},bad name"], "is not an interface name"),
    ):
        result = sites.run("ga", [*base, *args], timeout=30)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr, (args, result.stderr)
    assert _all_rules(sites, "ga") == []


@pytest.mark.timeout(90)
def test_icmp_errors_about_decrypted_packets_quote_no_plaintext(sites: Topology, tmp_path: Path) -> None:
    """gb cannot forward a decrypted packet to b (an unreachable route): its kernel's ICMP host
    unreachable would quote the plaintext; the engine cuts the quote to the IP header and 8 TCP
    bytes (sequence number in wire space) before it leaves through the outside interface."""
    from scapy.all import ICMP, IP, rdpcap

    daemons = [
        start_daemon(sites, g, tmp_path, ["--outside", sites.outside[g]], mode="gateway") for g in ("ga", "gb")
    ]
    marker = b"PLAINTEXT-MARKER-" * 40
    b_addr = sites.addresses["b"]
    server = start_ready(sites, "b", [sys.executable, "-u", "-c", (
        "import socket, time\n"
        f"s = socket.create_server(('{b_addr}', 9000)); print('listening')\n"
        "c, _ = s.accept(); c.recv(100); time.sleep(6)\n")], "listening")  # fmt: skip
    pcap = tmp_path / "outside.pcap"
    try:
        with capture(sites, "ga", pcap, ifname=sites.outside["ga"], bpf="icmp or tcp"):
            client = sites.popen("a", [sys.executable, "-c", (
                "import socket, sys, time\n"
                f"c = socket.create_connection(('{b_addr}', 9000), timeout=5)\n"
                "c.sendall(b'hello'); time.sleep(1.5)\n"
                f"c.sendall({marker!r}); time.sleep(2)\n")])
            time.sleep(0.8)
            sites.check("gb", ["ip", "route", "add", "unreachable", f"{b_addr}/32"])
            client.wait(timeout=20)
        counters = daemons[1].counters()
    finally:
        server.kill()
        server.wait(timeout=5)
        stops = [d.stop() for d in daemons]
    packets = rdpcap(str(pcap))
    errors = [p for p in packets if ICMP in p and p[ICMP].type == 3]
    assert errors, "gb sent no host unreachable"
    for error in errors:
        quote = bytes(error[ICMP].payload)
        assert len(quote) == 28, len(quote)  # IP header + 8 bytes of TCP
        assert IP in error
    assert b"PLAINTEXT-MARKER" not in pcap.read_bytes()
    assert counters.get("engine.icmp_rewritten", counters.get("icmp_rewritten", 0)) >= 1, counters
    assert stops == [0, 0]
