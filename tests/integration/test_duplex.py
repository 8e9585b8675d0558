"""Long-lived connections with traffic both ways at once on a realistic path (README: What the engine
does on a bad network).

Topology a - r - b; the daemons run on a and b in host mode. On every connection b sends a lot to a
while a sends to b (`nfq_tcpcrypt.lab.duplex`), so data segments carry SACK blocks both ways. The
path loses at random in r (both directions), also with reordering, duplication and re-segmentation,
a 1400-byte link, 16 connections at once, a minute of idling, and IPv6; or the receiving host loses
after its daemon (an INPUT rule, a tiny receive buffer). Each case checks equal digests both ways on
every connection, no plaintext on the wire, every connection encrypted, clean daemons (and, as every
integration test, no failed injection).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nfq_tcpcrypt.lab.net import (
    DUPLEX_PORT,
    IFNAMES,
    ROUTER_IFNAMES,
    Daemon,
    DuplexResult,
    Topology,
    capture,
    daemon_rules,
    drop_on_wire,
    duplex_needles,
    duplex_transfer,
    gro_on_arrival,
    rule_packets,
    segment_on_wire,
    shell_faults,
    start_daemon,
)
from nfq_tcpcrypt.tools.pcapcheck import analyze
from tests.integration.conftest import lab_topology
from tests.integration.test_network import middlebox

MIB = 1024 * 1024


def _loss(topo: Topology, chain: str, side: str, probability: float, ipv6: bool = False) -> None:
    """Random loss of `probability` of the TCP packets in `side`'s filter `chain`."""
    topo.check(side, ["ip6tables" if ipv6 else "iptables", "-A", chain, "-p", "tcp", "-m", "statistic",
                      "--mode", "random", "--probability", str(probability), "-j", "DROP"])  # fmt: skip


def _loss_in_router(topo: Topology, probability: float, ipv6: bool = False) -> None:
    """r loses `probability` of the TCP packets it forwards, both ways. The hosts' links segment what
    leaves them and merge what arrives (GRO), as NICs do, so r loses MTU-sized packets: thousands per
    transfer. (Over veth with offload on, a few hundred 64 KiB super-packets cross r, and a 1 % loss
    may then drop none of them.)"""
    for side in ("a", "b"):
        segment_on_wire(topo, side)
        gro_on_arrival(topo, side)
    _loss(topo, "FORWARD", "r", probability, ipv6)


def _run(
    topo: Topology, tmp_path: Path, a_sends: int, b_sends: int, connections: int = 1, ipv6: bool = False,
    client_args: tuple[str, ...] = (), timeout: float = 100.0, gateways: bool = False, wire_loss: float = 0.0,
) -> tuple[DuplexResult, dict[str, Any]]:
    """Daemons on a and b (with `gateways`: on ga and gb in gateway mode, `wire_loss` on their outside
    interfaces), a capture on a's veth (gb's outside one), the duplex transfer; every check but the
    case's own."""
    daemons: dict[str, Daemon] = {}
    pcap = tmp_path / "wire.pcap"
    sides, mode = (("ga", "gb"), "gateway") if gateways else (("a", "b"), "host")
    try:
        for side in sides:
            daemons[side] = start_daemon(topo, side, tmp_path, ["--ipv6"] if ipv6 else [], mode=mode)
        for side in sides if wire_loss else ():
            drop_on_wire(topo, side, wire_loss, ipv6)
        with capture(topo, "gb" if gateways else "a", pcap):
            result = duplex_transfer(topo, a_sends, b_sends, connections, ipv6=ipv6, client_args=client_args,
                                     timeout=timeout)  # fmt: skip
        sessions = {side: daemon.sessions() for side, daemon in daemons.items()}
    finally:
        for daemon in daemons.values():
            daemon.stop()
    addresses = topo.addresses6 if ipv6 else topo.addresses
    wire = analyze(pcap, addresses["a"], addresses["b"], DUPLEX_PORT, duplex_needles(a_sends, b_sends))
    logs = {side: Path(d.log).read_text()[-3000:] for side, d in daemons.items()}
    assert result.problems == [], (result.problems, logs)
    assert wire.leaks == {}, f"plaintext on the wire: {wire.leaks}"
    if connections == 1:
        assert wire.client_starts_with_init1 and wire.server_starts_with_init2
    port = f":{DUPLEX_PORT}"
    for side, daemon in daemons.items():
        ours = [s for s in sessions[side] if str(s["local"]).endswith(port) or str(s["remote"]).endswith(port)]
        assert len(ours) == connections and all(s["session_id"] and s["tep"] == "x25519" for s in ours), ours
        assert daemon.proc.returncode == 0, logs[side]
        assert daemon.final_counters is not None and shell_faults(daemon.final_counters) == {}, logs[side]
        assert daemon_rules(topo, side) == [] and daemon_rules(topo, side, ipv6=True) == []
        if gateways:  # the gateway's kernel refused nothing for size (SACK blocks budgeted)
            assert rule_packets(topo, side, "filter", "OUTPUT", "--icmp-type 3/4") == 0, side
    stats = {
        side: {key: sum(int(s[key]) for s in sessions[side]) for key in ("redelivered", "replayed")}
        for side in daemons
    }
    return result, stats


def _report(name: str, result: DuplexResult, **extra: object) -> None:
    print(f"[{name}] a->b {result.a_sends} and b->a {result.b_sends} bytes x{len(result.client['connections'])} "
          f"in {result.seconds:.2f}s " + " ".join(f"{k}={v}" for k, v in extra.items()))  # fmt: skip


@pytest.mark.timeout(150)
@pytest.mark.parametrize(("loss", "ipv6"), [(0.01, False), (0.03, False), (0.01, True)])
def test_loss_both_directions(routed: Topology, tmp_path: Path, loss: float, ipv6: bool) -> None:
    """r drops `loss` of forwarded TCP both ways while 8 MiB go b -> a and 1 MiB a -> b on one connection."""
    _loss_in_router(routed, loss, ipv6)
    result, stats = _run(routed, tmp_path, 1 * MIB, 8 * MIB, ipv6=ipv6)
    dropped = rule_packets(routed, "r", "filter", "FORWARD", "statistic", ipv6=ipv6)
    _report(f"loss {loss:.0%}{' ipv6' if ipv6 else ''}", result, dropped_in_r=dropped, daemons=json.dumps(stats))
    assert dropped > 0


@pytest.mark.timeout(150)
def test_loss_reorder_duplicate_resegment(routed: Topology, tmp_path: Path) -> None:
    """1 % loss in r, then a box that reorders, duplicates and re-segments what is left."""
    _loss_in_router(routed, 0.01)
    with middlebox(routed, "--mode", "shuffle", "--seed", "3") as counts:
        result, stats = _run(routed, tmp_path, 1 * MIB, 4 * MIB)
    dropped = rule_packets(routed, "r", "filter", "FORWARD", "statistic")
    _report("loss+shuffle", result, dropped_in_r=dropped, middlebox=json.dumps(counts))
    assert dropped > 0 and counts["reordered"] and counts["duplicated"] and counts["resegmented"], counts


@pytest.mark.timeout(150)
def test_loss_with_a_1400_byte_link(routed: Topology, tmp_path: Path) -> None:
    """1 % loss in r and MTU 1400 on the r - b link (both ends)."""
    routed.set_mtu("r", ROUTER_IFNAMES["b"], 1400)
    routed.set_mtu("b", routed.ifnames["b"], 1400)
    _loss_in_router(routed, 0.01)
    result, stats = _run(routed, tmp_path, 1 * MIB, 4 * MIB)
    _report("loss+mtu1400", result, dropped_in_r=rule_packets(routed, "r", "filter", "FORWARD", "statistic"))


@pytest.mark.timeout(150)
def test_sixteen_connections_under_loss(routed: Topology, tmp_path: Path) -> None:
    """16 connections at once, each 256 KiB a -> b and 512 KiB b -> a, 1 % loss in r."""
    _loss_in_router(routed, 0.01)
    result, stats = _run(routed, tmp_path, 256 * 1024, 512 * 1024, connections=16)
    _report("16 connections", result, dropped_in_r=rule_packets(routed, "r", "filter", "FORWARD", "statistic"))


@pytest.mark.timeout(240)
def test_idle_minute_in_the_middle(routed: Topology, tmp_path: Path) -> None:
    """Both senders stop for 60 s halfway (the connection idles a minute), then go on; 1 % loss."""
    _loss_in_router(routed, 0.01)
    result, stats = _run(routed, tmp_path, 1 * MIB, 2 * MIB, timeout=200,
                         client_args=("--pause-after", str(MIB // 2), "--pause", "60"))  # fmt: skip
    _report("idle 60 s", result)
    assert result.seconds >= 60


@pytest.mark.timeout(150)
@pytest.mark.parametrize("loss", [0.01, 0.05])
def test_input_drop_on_the_receiving_host(routed: Topology, tmp_path: Path, loss: float) -> None:
    """a's INPUT chain drops every (1 / `loss`)th data packet: after a's daemon, so only a's daemon can
    repair it. 16 MiB toward a: with GSO super-packets a's daemon hands its stack up to 64 KiB per
    packet, so at least 256 data packets pass INPUT. A count, not a random draw: out of a few hundred
    packets a 1 % draw may hit none."""
    every = round(1 / loss)
    nth = ["--mode", "nth", "--every", str(every), "--packet", str(every - 1)]
    routed.check("a", ["iptables", "-A", "INPUT", "-p", "tcp", "-m", "length", "--length", "1000:65535",
                       "-m", "statistic", *nth, "-j", "DROP"])  # fmt: skip
    result, stats = _run(routed, tmp_path, 1 * MIB, 16 * MIB)
    dropped = rule_packets(routed, "a", "filter", "INPUT", "statistic")
    _report(f"INPUT drop {loss:.0%}", result, dropped_in_a=dropped, daemons=json.dumps(stats))
    assert dropped > 0
    assert stats["a"]["redelivered"] > 0, stats


@pytest.mark.timeout(150)
def test_tiny_receive_buffer(routed: Topology, tmp_path: Path) -> None:
    """a's sockets have SO_RCVBUF 4096: a's stack itself drops what does not fit its queue."""
    result, stats = _run(routed, tmp_path, 256 * 1024, 2 * MIB, client_args=("--rcvbuf", "4096"))
    _report("rcvbuf 4096", result, daemons=json.dumps(stats))


@pytest.fixture
def sites() -> Iterator[Topology]:
    """a - ga - gb - b, always removed afterwards."""
    yield from lab_topology("nfqdx", gateways=True)


@pytest.mark.timeout(150)
def test_gateways_loss_both_directions(sites: Topology, tmp_path: Path) -> None:
    """Gateway mode: 1 % loss between the gateways, both ways at once, a 1400-byte inside link at a
    (plaintext toward a carries SACK blocks within the inside MTU: no frag-needed from the gateways)."""
    sites.set_mtu("a", IFNAMES["a"], 1400)
    sites.set_mtu("ga", sites.inside["ga"], 1400)
    for side in ("ga", "gb"):
        sites.check(side, ["iptables", "-I", "OUTPUT", "-p", "icmp", "--icmp-type", "fragmentation-needed"])
    result, stats = _run(sites, tmp_path, 1 * MIB, 4 * MIB, gateways=True, wire_loss=0.01)
    _report("gateways loss 1%", result, daemons=json.dumps(stats))
