"""Host mode through a router namespace with middleboxes in the path (README: What the engine does on a bad network).

Topology a - r - b (`Topology(router=True)`): the daemons run on a and b in host mode, r forwards and
plays the middlebox: random loss, NAT, a stateful firewall dropping INVALID, a 1400-byte link, an
option-stripping router, an NFQUEUE program that reorders, duplicates and re-segments, and one that
flips a ciphertext bit. Every test checks the daemons exit 0 on SIGTERM, the shell saw no fault, and
no rule of the daemon is left.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from nfq_tcpcrypt.lab.net import (
    HTTP_PORT,
    ROUTER_IFNAMES,
    Daemon,
    Topology,
    TransferResult,
    capture,
    daemon_rules,
    gro_on_arrival,
    http_server,
    http_transfer,
    make_payload,
    rule_packets,
    segment_on_wire,
    shell_faults,
    start_daemon,
    start_ready,
)

SIZE = 2 * 1024 * 1024
MIDDLEBOX = Path(__file__).with_name("middlebox.py")
MIDDLEBOX_QUEUE = 7300
log = logging.getLogger(__name__)


def _iptables(topo: Topology, side: str, *args: str) -> None:
    topo.check(side, ["iptables", *args])


def _assert_clean(topo: Topology, daemons: dict[str, Daemon], counters: dict[str, dict[str, int]]) -> None:
    """No crash (exit 0 on SIGTERM), no shell fault, no rule of the daemon left behind."""
    for side, daemon in daemons.items():
        text = Path(daemon.log).read_text()[-3000:] if Path(daemon.log).exists() else ""
        assert daemon.proc.returncode == 0, f"daemon {side} exit {daemon.proc.returncode}: {text}"
        assert shell_faults(counters.get(side, {})) == {}, text
        assert daemon_rules(topo, side) == [] and daemon_rules(topo, side, ipv6=True) == [], side


def _assert_encrypted(result: TransferResult) -> None:
    """Digest equal, Init magics first, no plaintext on a's wire, equal session IDs, clean daemons."""
    wire = result.wire
    assert result.received_sha256 == result.sent_sha256
    # Not `wire.synack_has_eno`: it reflects the last SYN-ACK, and a retransmitted one lacks ENO (see
    # test_lost_synack_stays_encrypted).
    assert wire.syn_has_eno
    assert wire.client_starts_with_init1, wire.client_stream[:8].hex()
    assert wire.server_starts_with_init2, wire.server_stream[:8].hex()
    assert wire.leaks == {}, f"plaintext on the wire: {wire.leaks}"
    a, b = result.session_for("a"), result.session_for("b")
    assert a is not None and b is not None, result.sessions
    assert a["session_id"] == b["session_id"] and a["tep"] == b["tep"] == "x25519"


def _report(name: str, result: TransferResult, **extra: object) -> None:
    """One line per scenario on stdout (shown with -s or -rP) with the numbers the issue asks for."""
    print(
        f"[{name}] {len(result.wire.server_stream)} wire bytes in {result.fetch_seconds:.2f}s "
        + " ".join(f"{key}={value}" for key, value in extra.items())
    )


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("loss", "ipv6"), [(0.01, False), (0.05, False), (0.01, True)])
def test_random_loss_in_router(routed: Topology, tmp_path: Path, loss: float, ipv6: bool) -> None:
    """Loss recovery (docs/architecture.md): r drops `loss` of forwarded TCP packets, both directions.
    The hosts' links segment what leaves them and merge what arrives (GRO), as NICs do: r loses
    MTU-sized packets, not whole GSO super-packets (the daemons' queues still get those on the
    fast backend, both ways)."""
    for side in ("a", "b"):
        segment_on_wire(routed, side)
        gro_on_arrival(routed, side)
    tool = "ip6tables" if ipv6 else "iptables"
    routed.check("r", [tool, "-A", "FORWARD", "-p", "tcp", "-m", "statistic", "--mode", "random",
                       "--probability", str(loss), "-j", "DROP"])  # fmt: skip
    result = http_transfer(routed, tmp_path, size=SIZE, timeout=90, ipv6=ipv6)
    dropped = rule_packets(routed, "r", "filter", "FORWARD", "statistic", ipv6=ipv6)
    _report(f"loss {loss:.0%}{' ipv6' if ipv6 else ''}", result, dropped_in_r=dropped)
    _assert_encrypted(result)
    assert dropped > 0
    _assert_clean(routed, result.daemons, result.counters)


@pytest.mark.timeout(120)
def test_nat_masquerade(routed: Topology, tmp_path: Path) -> None:
    """NAT (docs/architecture.md): MASQUERADE on r's b-facing interface; b sees r's address, both see one session."""
    _iptables(routed, "r", "-t", "nat", "-A", "POSTROUTING", "-o", ROUTER_IFNAMES["b"], "-j", "MASQUERADE")
    result = http_transfer(routed, tmp_path, size=SIZE, timeout=90)
    masqueraded = rule_packets(routed, "r", "nat", "POSTROUTING", "MASQUERADE")
    _report("nat", result, masqueraded_connections=masqueraded)
    _assert_encrypted(result)
    assert masqueraded > 0
    b = result.session_for("b")
    assert b is not None and b["remote"].startswith("10.77.2.254:"), b
    _assert_clean(routed, result.daemons, result.counters)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("loss", [0.0, 0.02])
def test_stateful_firewall_drops_invalid(routed: Topology, tmp_path: Path, loss: float) -> None:
    """Issue 4: conntrack with be_liberal=0 dropping INVALID in r (FORWARD) and on both hosts (INPUT, OUTPUT).

    With `loss`, r also drops that fraction of forwarded TCP after the conntrack check, so window
    tracking sees retransmissions, SACKs and out-of-order data too.
    """
    _iptables(routed, "r", "-A", "FORWARD", "-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP")
    if loss:
        _iptables(routed, "r", "-A", "FORWARD", "-p", "tcp", "-m", "statistic", "--mode", "random",
                  "--probability", str(loss), "-j", "DROP")  # fmt: skip
    routed.check("r", ["sysctl", "-qw", "net.netfilter.nf_conntrack_tcp_be_liberal=0"])
    for side in ("a", "b"):
        for chain in ("INPUT", "OUTPUT"):
            _iptables(routed, side, "-A", chain, "-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP")
    result = http_transfer(routed, tmp_path, size=SIZE, timeout=90)
    drops = {"r FORWARD": rule_packets(routed, "r", "filter", "FORWARD", "INVALID")}
    for side in ("a", "b"):
        for chain in ("INPUT", "OUTPUT"):
            drops[f"{side} {chain}"] = rule_packets(routed, side, "filter", chain, "INVALID")
    _report(f"stateful firewall, loss {loss:.0%}", result, invalid_drops=json.dumps(drops))
    _assert_encrypted(result)
    assert drops == dict.fromkeys(drops, 0), f"INVALID drops: {drops}"
    _assert_clean(routed, result.daemons, result.counters)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "link",
    [
        "r-b",
        "a-r",
        "a-r+advmss",
    ],
)
def test_mtu_1400_link(routed: Topology, tmp_path: Path, link: str) -> None:
    """MSS clamping and ICMP frag-needed (docs/architecture.md: Sizes): MTU 1400 on both ends of one link.

    "r-b": the server's own link is small, so b's kernel refuses the daemon's 20-byte-longer packets
    and reports that to b over lo. "a-r": the client's link. "a-r+advmss": the client's, and a
    advertises MSS 1460 anyway (route advmss), so b's first full segments exceed the path: r sends
    b ICMP frag-needed (MTU 1400), which b's daemon must rewrite to 1380 for b's stack.
    """
    host = "b" if link == "r-b" else "a"
    routed.set_mtu("r", ROUTER_IFNAMES[host], 1400)
    routed.set_mtu(host, routed.ifnames[host], 1400)
    if link.endswith("+advmss"):
        routed.check("a", ["ip", "route", "replace", "default", "via", "10.77.1.254", "advmss", "1460"])
    _iptables(routed, "r", "-A", "OUTPUT", "-p", "icmp", "--icmp-type", "fragmentation-needed")
    result = http_transfer(routed, tmp_path, size=SIZE, timeout=60)
    icmp = rule_packets(routed, "r", "filter", "OUTPUT", "--icmp-type 3/4")
    rewritten = {side: {k: v for k, v in c.items() if "icmp" in k} for side, c in result.counters.items()}
    _report(f"mtu 1400 {link}", result, frag_needed_from_r=icmp, icmp_counters=json.dumps(rewritten))
    _assert_encrypted(result)
    if link.endswith("+advmss"):
        assert icmp > 0, "r sent no frag-needed: the path MTU was never exceeded"
    _assert_clean(routed, result.daemons, result.counters)


# Handshake segments lost once, deterministically: the first SYN-ACK (b -> a), or the first a -> b
# segment with a payload (the third ACK carrying Init1, RFC 8548 §4.3).
LOSE_ONCE = {
    "syn-ack": ["-i", ROUTER_IFNAMES["b"], "-p", "tcp", "--tcp-flags", "SYN,ACK", "SYN,ACK"],
    "init1": ["-i", ROUTER_IFNAMES["a"], "-p", "tcp", "--dport", str(HTTP_PORT), "-m", "length",
              "--length", "100:65535"],
}  # fmt: skip


@pytest.mark.timeout(120)
@pytest.mark.parametrize("lost", sorted(LOSE_ONCE))
def test_lost_handshake_segment(routed: Topology, tmp_path: Path, lost: str) -> None:
    """RFC 8547 §4.6 / RFC 8548 §4.3: losing the SYN-ACK or the Init1 segment once still ends encrypted."""
    _iptables(routed, "r", "-A", "FORWARD", *LOSE_ONCE[lost], "-m", "statistic", "--mode", "nth",
              "--every", "1000000", "--packet", "0", "-j", "DROP")  # fmt: skip
    result = http_transfer(routed, tmp_path, size=256 * 1024, timeout=30)
    dropped = rule_packets(routed, "r", "filter", "FORWARD", "statistic")
    _report(f"lost {lost}", result, dropped=dropped)
    assert dropped == 1
    _assert_encrypted(result)
    _assert_clean(routed, result.daemons, result.counters)


@pytest.mark.timeout(120)
def test_option_stripping_router_falls_back_to_plain(routed: Topology, tmp_path: Path) -> None:
    """RFC 8547 §4.6: r strips option 69 from every TCP segment; both ends fall back to plain TCP."""
    _iptables(routed, "r", "-t", "mangle", "-A", "FORWARD", "-p", "tcp", "-j", "TCPOPTSTRIP",
              "--strip-options", "69")  # fmt: skip
    result = http_transfer(routed, tmp_path, size=SIZE, timeout=90)
    wire = result.wire
    _report("option stripping", result, leaks=sorted(wire.leaks))
    assert result.received_sha256 == result.sent_sha256
    assert wire.syn_has_eno and not wire.synack_has_eno  # a's SYN leaves with ENO, r strips it
    assert not wire.any_init_magic
    # The same checks that prove encryption must see the plaintext here, or they prove nothing.
    assert "http-status-line" in wire.leaks and any(name.startswith("marker") for name in wire.leaks)
    for side in ("a", "b"):
        entry = result.session_for(side)
        assert entry is None or not entry.get("session_id"), entry
    _assert_clean(routed, result.daemons, result.counters)


@contextlib.contextmanager
def middlebox(topo: Topology, *args: str) -> Iterator[dict[str, int]]:
    """tests/integration/middlebox.py in r on forwarded TCP; the dict gets its counts when the block ends."""
    counts: dict[str, int] = {}
    proc = start_ready(topo, "r", [sys.executable, str(MIDDLEBOX), "--queue", str(MIDDLEBOX_QUEUE), *args],
                       "ready")  # fmt: skip
    rule = ["FORWARD", "-p", "tcp", "-j", "NFQUEUE", "--queue-num", str(MIDDLEBOX_QUEUE)]
    _iptables(topo, "r", "-A", *rule)
    try:
        yield counts
    finally:
        _iptables(topo, "r", "-D", *rule)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
        assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
        counts.update(json.loads(out.decode().strip().splitlines()[-1]))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", [1, 2])
def test_reorder_duplicate_resegment(routed: Topology, tmp_path: Path, seed: int) -> None:
    """The receiver (docs/architecture.md): a box in r reorders, duplicates and re-segments forwarded TCP at random."""
    with middlebox(routed, "--mode", "shuffle", "--seed", str(seed)) as counts:
        result = http_transfer(routed, tmp_path, size=SIZE, timeout=90)
    _report(f"shuffle seed {seed}", result, middlebox=json.dumps(counts))
    _assert_encrypted(result)
    assert counts["reordered"] > 0 and counts["duplicated"] > 0 and counts["resegmented"] > 0, counts
    _assert_clean(routed, result.daemons, result.counters)


@pytest.mark.timeout(120)
def test_tampered_ciphertext_aborts(routed: Topology, tmp_path: Path) -> None:
    """RFC 8548 §4.2/§3.7: one flipped ciphertext bit b -> a; curl errors, writes a strict prefix, no forged byte."""
    served = tmp_path / "www"
    served.mkdir()
    source = served / "payload.bin"
    make_payload(source, SIZE)
    received = tmp_path / "received.bin"
    daemons: dict[str, Daemon] = {}
    counters: dict[str, dict[str, int]] = {}
    sessions: dict[str, list[dict[str, object]]] = {}
    try:
        for side in ("a", "b"):
            daemons[side] = start_daemon(routed, side, tmp_path)
        with middlebox(routed, "--mode", "tamper", "--after", "262144") as counts:
            with capture(routed, "a", tmp_path / "wire.pcap"), http_server(routed, "b", served) as url:
                curl = routed.run("a", ["curl", "-sS", "--max-time", "30", "-o", str(received),
                                        f"{url}/payload.bin"], timeout=45)  # fmt: skip
            for side, daemon in daemons.items():
                counters[side] = daemon.counters()
                sessions[side] = daemon.sessions()
    finally:
        for daemon in daemons.values():
            daemon.stop()
    logs = {side: Path(daemon.log).read_text() for side, daemon in daemons.items()}
    got = received.read_bytes() if received.exists() else b""
    _report_line = f"curl rc={curl.returncode} ({curl.stderr.strip()}) wrote {len(got)} of {SIZE} bytes"
    print(f"[tamper] {_report_line} middlebox={json.dumps(counts)} sessions={json.dumps(sessions)}")
    assert counts["tampered"] == 1, counts
    assert curl.returncode != 0, _report_line
    assert len(got) < SIZE and source.read_bytes().startswith(got), "curl wrote bytes that are not the file's"
    assert "SessionAborted" in logs["a"], logs["a"][-3000:]
    states = {side: [entry["state"] for entry in table] for side, table in sessions.items()}
    assert "aborted" in states["a"], states
    _assert_clean(routed, daemons, counters)


def _retrans_segs(topo: Topology, side: str) -> int:
    """Tcp RetransSegs of `side`'s namespace (/proc/net/snmp)."""
    lines = [line.split() for line in topo.check(side, ["cat", "/proc/net/snmp"]).splitlines()]
    header, values = next(pair for pair in itertools.pairwise(lines) if pair[0][0] == "Tcp:")
    return int(values[header.index("RetransSegs")])


@pytest.mark.timeout(120)
def test_loss_recovery_resends_only_what_was_lost(routed: Topology, tmp_path: Path) -> None:
    """Loss is repaired by fast retransmit of what was lost, not of whole flights.

    r drops every 150th full-sized b -> a segment (deterministic); b should resend about that many.
    Measured with pass-through daemons (same queues, segments unchanged): 9 resent for 9 dropped;
    with nfq_tcpcrypt: 180-200 resent for 10 dropped.
    """
    _iptables(routed, "r", "-A", "FORWARD", "-i", ROUTER_IFNAMES["b"], "-p", "tcp", "-m", "length",
              "--length", "1000:65535", "-m", "statistic", "--mode", "nth", "--every", "150",
              "--packet", "149", "-j", "DROP")  # fmt: skip
    before = _retrans_segs(routed, "b")
    result = http_transfer(routed, tmp_path, size=SIZE, timeout=90)
    resent = _retrans_segs(routed, "b") - before
    dropped = rule_packets(routed, "r", "filter", "FORWARD", "statistic")
    _report("deterministic loss", result, dropped_in_r=dropped, resent_by_b=resent)
    _assert_encrypted(result)
    _assert_clean(routed, result.daemons, result.counters)
    assert resent <= 3 * dropped + 5, f"b resent {resent} segments for {dropped} lost"
