"""Attacks from a third namespace on the path (README: Security model).

Topology a - r - b with daemons on a and b; the attacker is r, which sees every wire packet and
sends real packets crafted with scapy (tools/scapy_layers.py for the ENO option) through a raw
socket. Each test proves from the capture on r that no plaintext of the encrypted connection
crossed the wire, and from what the applications received that no forged byte reached them.
"""

from __future__ import annotations

import secrets
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.inet import ICMP, IP, TCP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt, PadN
from scapy.utils import PcapReader, RawPcapReader

from nfq_tcpcrypt.lab.net import (
    HTTP_PORT,
    Daemon,
    LabError,
    Topology,
    capture,
    http_server,
    make_payload,
    start_daemon,
)
from nfq_tcpcrypt.tools.pcapcheck import analyze
from nfq_tcpcrypt.tools.scapy_layers import eno_option

from .conftest import lab_topology

PORT = 9000
MASK = 0xFFFFFFFF

# A line-driven TCP endpoint: "send HEX", "wait N" (until N bytes in all arrived), "close".
CHAT = r"""
import select, socket, sys
role, addr, port, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
if role == "server":
    ls = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((addr, port))
    ls.listen(1)
    print("listening", flush=True)
    conn, _ = ls.accept()
else:
    conn = socket.create_connection((addr, port), timeout=10)
print("connected", conn.getsockname()[1], flush=True)
received = bytearray()
for line in sys.stdin:
    cmd, _, arg = line.strip().partition(" ")
    try:
        if cmd == "send":
            conn.settimeout(60)
            conn.sendall(bytes.fromhex(arg))
            print("sent", flush=True)
        elif cmd == "wait":
            conn.settimeout(60)
            while len(received) < int(arg):
                chunk = conn.recv(65536)
                if not chunk:
                    raise EOFError
                received += chunk
            print("got", len(received), flush=True)
        elif cmd == "close":
            break
    except Exception as exc:
        print("error", type(exc).__name__, len(received), flush=True)
    finally:
        open(out, "wb").write(received)
"""

# Sends raw IP packets (hex, crafted by the test with scapy) from the namespace it runs in.
SEND_RAW = r"""
import socket, sys
v4 = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
v6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)  # header included (raw(7))
for text in sys.argv[1:]:
    packet = bytes.fromhex(text)
    if packet[0] >> 4 == 6:
        v6.sendto(packet, (socket.inet_ntop(socket.AF_INET6, packet[24:40]), 0))
    else:
        v4.sendto(packet, (socket.inet_ntoa(packet[16:20]), 0))
"""


@pytest.fixture
def routed_attack() -> Iterator[Topology]:
    """a - r - b, r the attacker on the path."""
    yield from lab_topology("nfqatk", router=True)


class Chat:
    """One CHAT process in a namespace, driven line by line."""

    def __init__(self, topo: Topology, side: str, role: str, addr: str, out: Path) -> None:
        self.out = out
        self.proc = topo.popen(
            side, [sys.executable, "-u", "-c", CHAT, role, addr, str(PORT), str(out)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip

    def line(self, timeout: float = 20.0) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise LabError(f"chat: no line within {timeout}s")
        return self.proc.stdout.readline().strip()

    def write(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def do(self, command: str, timeout: float = 25.0) -> str:
        self.write(command)
        return self.line(timeout)

    def close(self) -> bytes:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write("close\n")
            self.proc.stdin.flush()
            self.proc.wait(10)
        return self.out.read_bytes() if self.out.exists() else b""


def _daemons(
    topo: Topology, tmp_path: Path, config: dict[str, str] | None = None, ipv6: bool = False
) -> dict[str, Daemon]:
    daemons = {}
    for side in ("a", "b"):
        extra: list[str] = ["--ipv6"] if ipv6 else []
        if config and side in config:
            path = tmp_path / f"{side}.toml"
            path.write_text(config[side])
            extra += ["--config", str(path)]
        daemons[side] = start_daemon(topo, side, tmp_path, extra)
    return daemons


def _connect(topo: Topology, tmp_path: Path, ipv6: bool = False) -> tuple[Chat, Chat, int]:
    address = (topo.addresses6 if ipv6 else topo.addresses)["b"]
    server = Chat(topo, "b", "server", address, tmp_path / "server.bin")
    assert server.line() == "listening"
    client = Chat(topo, "a", "client", address, tmp_path / "client.bin")
    port = int(client.line().split()[1])
    assert server.line().startswith("connected")
    return client, server, port


def _send_raw(topo: Topology, packets: list[Any]) -> None:
    result = topo.run("r", [sys.executable, "-c", SEND_RAW, *(bytes(p).hex() for p in packets)], timeout=30)
    assert result.returncode == 0, result.stderr


def _packets(pcap: Path) -> list[Any]:
    """The packets captured so far (a record tcpdump is still writing is left out)."""
    out: list[Any] = []
    try:
        with PcapReader(str(pcap)) as reader:
            for packet in reader:
                out.append(packet)
    except Exception:  # noqa: BLE001 - a partly written last record
        pass
    return out


def _last_wire(pcap: Path, src: str, sport: int, min_payload: int = 0) -> Any:
    """The last TCP segment from src:sport (with at least `min_payload` bytes) seen so far in the
    capture, as a scapy packet: the on-path attacker's sniffing (raw records scanned from the end,
    only the match is dissected)."""
    frames = []
    try:
        with RawPcapReader(str(pcap)) as reader:
            frames = [frame for frame, _ in reader]
    except Exception:  # noqa: BLE001 - a partly written last record
        pass
    want = bytes(int(part) for part in src.split("."))
    for frame in reversed(frames):
        ip = frame[14:]
        if len(ip) < 40 or ip[0] >> 4 != 4 or ip[9] != 6 or ip[12:16] != want:
            continue
        tcp = ip[(ip[0] & 15) * 4 :]
        if int.from_bytes(tcp[0:2], "big") != sport:
            continue
        if len(tcp) - (tcp[12] >> 4) * 4 >= min_payload:
            return IP(bytes(ip))
    raise AssertionError(f"nothing from {src}:{sport} in the capture")


def _no_leak(pcap: Path, topo: Topology, port: int, secrets_sent: list[bytes]) -> None:
    needles = {f"secret{i}": s for i, s in enumerate(secrets_sent)}
    report = analyze(pcap, topo.addresses["a"], topo.addresses["b"], port, needles)
    assert report.syn_has_eno and report.synack_has_eno
    assert report.leaks == {}, f"plaintext on the wire: {report.leaks}"


def _session(daemon: Daemon, port: int) -> dict[str, Any]:
    (entry,) = [s for s in daemon.sessions() if s["local"].endswith(f":{port}") or s["remote"].endswith(f":{port}")]
    return entry


@pytest.mark.timeout(180)
def test_forged_syn_and_rst_on_a_live_encrypted_connection(routed_attack: Topology, tmp_path: Path) -> None:
    """RFC 5961 from r: forged SYNs (with and without ENO) and blind RSTs neither reset nor
    downgrade the connection; everything after them is still encrypted and whole."""
    topo = routed_attack
    daemons = _daemons(topo, tmp_path)
    pcap = tmp_path / "r.pcap"
    a_ip, b_ip = topo.addresses["a"], topo.addresses["b"]
    chunks = [secrets.token_bytes(3000) for _ in range(4)]
    with capture(topo, "r", pcap, ifname="veth-rb"):
        client, server, cport = _connect(topo, tmp_path)
        assert client.do("send " + chunks[0].hex()) == "sent"
        assert server.do(f"wait {len(chunks[0])}").startswith("got")
        assert server.do("send " + chunks[1].hex()) == "sent"
        assert client.do(f"wait {len(chunks[1])}").startswith("got")
        before = _session(daemons["b"], PORT)
        assert before["state"] == "encrypting"
        time.sleep(0.5)
        last = _last_wire(pcap, a_ip, cport)
        wire_next = (last[TCP].seq + len(bytes(last[TCP].payload))) & MASK
        forged = [
            IP(src=a_ip, dst=b_ip) / TCP(sport=cport, dport=PORT, flags="S", seq=0x1234567),
            IP(src=a_ip, dst=b_ip) / TCP(sport=cport, dport=PORT, flags="S", seq=0x7654321,
                                         options=[("MSS", 1460), eno_option(teps=[0x21])]),
            IP(src=a_ip, dst=b_ip) / TCP(sport=cport, dport=PORT, flags="R", seq=(wire_next + 1000) & MASK),
            IP(src=a_ip, dst=b_ip) / TCP(sport=cport, dport=PORT, flags="R", seq=(wire_next + 2**30) & MASK),
            IP(src=b_ip, dst=a_ip) / TCP(sport=PORT, dport=cport, flags="R", seq=0x4000),
            # Plaintext in the peer's name right after the forged SYN: must never be delivered.
            IP(src=a_ip, dst=b_ip) / TCP(sport=cport, dport=PORT, flags="PA", seq=0x1234568,
                                         ack=last[TCP].ack) / b"FORGED-PLAINTEXT",
        ]  # fmt: skip
        _send_raw(topo, forged)
        time.sleep(1.0)
        assert server.do("send " + chunks[2].hex()) == "sent"
        assert client.do(f"wait {len(chunks[1]) + len(chunks[2])}").startswith("got")
        assert client.do("send " + chunks[3].hex()) == "sent"
        assert server.do(f"wait {len(chunks[0]) + len(chunks[3])}").startswith("got")
        after = _session(daemons["b"], PORT)
        counters = daemons["b"].counters()
        got_client, got_server = client.close(), server.close()
    assert got_server == chunks[0] + chunks[3] and got_client == chunks[1] + chunks[2]
    assert after["state"] == "encrypting" and after["session_id"] == before["session_id"]
    _no_leak(pcap, topo, PORT, chunks)
    challenge = [p for p in _packets(pcap) if TCP in p and p[IP].src == b_ip and p[TCP].flags == "A"]
    assert challenge, "no challenge ACK from b"
    assert counters.get("rewritten", 0) > 0
    for daemon in daemons.values():
        assert daemon.stop() == 0


@pytest.mark.timeout(180)
def test_plaintext_behind_an_ipv6_extension_header(routed_attack: Topology, tmp_path: Path) -> None:
    """From r, plaintext in a's name at exactly the sequence and acknowledgment numbers b's stack
    expects next, behind a destination-options header (RFC 8200 §4.6): b's stack skips that
    header and would take the bytes, our codecs refuse the packet. It never reaches b's
    application, and the connection carries on encrypted and whole. b's daemon drops it itself
    (`malformed_dropped`); the rules' conntrack check would drop it too once passed on unmarked."""
    topo = routed_attack
    daemons = _daemons(topo, tmp_path, ipv6=True)
    pcap = tmp_path / "r.pcap"
    a_ip, b_ip = topo.addresses6["a"], topo.addresses6["b"]
    chunks = [secrets.token_bytes(3000) for _ in range(2)]
    with capture(topo, "r", pcap, ifname="veth-rb"):
        client, server, cport = _connect(topo, tmp_path, ipv6=True)
        assert client.do("send " + chunks[0].hex()) == "sent"
        assert server.do(f"wait {len(chunks[0])}").startswith("got")
        time.sleep(0.5)
        seen = [p[TCP] for p in _packets(pcap) if IPv6 in p and TCP in p]
        syn = next(t for t in seen if t.sport == cport and t.flags.S and not t.flags.A)
        synack = next(t for t in seen if t.dport == cport and t.flags.S and t.flags.A)
        stamp = [o for o in [t for t in seen if t.sport == cport][-1].options if o[0] == "Timestamp"]
        # Sequence numbers in b's stack's byte space: the attacker knows how much a's application
        # sent (b has sent nothing): no translation would be needed for these to be taken.
        forged = (IPv6(src=a_ip, dst=b_ip) / IPv6ExtHdrDestOpt(options=[PadN(optdata=b"\0" * 4)])
                  / TCP(sport=cport, dport=PORT, flags="PA", seq=(syn.seq + 1 + len(chunks[0])) & MASK,
                        ack=(synack.seq + 1) & MASK, window=65535, options=stamp) / b"FORGED-PLAINTEXT")  # fmt: skip
        _send_raw(topo, [forged])
        time.sleep(1.0)
        assert client.do("send " + chunks[1].hex()) == "sent"
        assert server.do(f"wait {len(chunks[0]) + len(chunks[1])}").startswith("got")
        counters = daemons["b"].counters()
        after = _session(daemons["b"], PORT)
        got_client, got_server = client.close(), server.close()
    assert got_server == chunks[0] + chunks[1] and got_client == b""
    assert after["state"] == "encrypting"
    assert counters.get("malformed_dropped", 0) >= 1, counters
    report = analyze(pcap, a_ip, b_ip, PORT, {f"secret{i}": c for i, c in enumerate(chunks)})
    assert report.leaks == {}, f"plaintext on the wire: {report.leaks}"
    for daemon in daemons.values():
        assert daemon.stop() == 0


@pytest.mark.timeout(180)
def test_syn_flood_with_and_without_eno_against_a_small_table(routed_attack: Topology, tmp_path: Path) -> None:
    """Spoofed SYNs from r (with and without ENO) cannot keep a genuine connection from being
    encrypted: embryonic sessions are evicted first."""
    topo = routed_attack
    config = "max_sessions = 16\nembryonic_timeout = 5.0\n"
    daemons = _daemons(topo, tmp_path, {"b": config})
    b_ip = topo.addresses["b"]
    flood = []
    for i in range(300):
        options = [("MSS", 1460)] + ([eno_option(teps=[0x21])] if i % 2 else [])
        flood.append(IP(src=f"10.77.1.{100 + i % 100}", dst=b_ip)
                     / TCP(sport=20000 + i, dport=PORT, flags="S", seq=i * 7919, options=options))
    pcap = tmp_path / "r.pcap"
    secret = secrets.token_bytes(5000)
    with capture(topo, "r", pcap, ifname="veth-rb"):
        server = Chat(topo, "b", "server", b_ip, tmp_path / "server.bin")
        assert server.line() == "listening"
        _send_raw(topo, flood)
        client = Chat(topo, "a", "client", b_ip, tmp_path / "client.bin")
        cport = int(client.line().split()[1])
        assert server.line().startswith("connected")
        assert client.do("send " + secret.hex()) == "sent"
        assert server.do(f"wait {len(secret)}").startswith("got")
        table = daemons["b"].sessions()
        counters = daemons["b"].counters()
        client.close()
        got = server.close()
    assert got == secret
    assert len(table) <= 16
    assert _session(daemons["b"], cport)["state"] in ("encrypting", "closed")
    assert counters.get("evicted_embryonic", 0) > 0, counters
    _no_leak(pcap, topo, PORT, [secret])
    for daemon in daemons.values():
        assert daemon.stop() == 0


@pytest.mark.timeout(180)
def test_forged_icmp_too_big(routed_attack: Topology, tmp_path: Path) -> None:
    """Forged "fragmentation needed" from r: a quote outside the data in flight is dropped, an MTU
    of 68 is taken as Linux's floor (552); the rest of the transfer goes at that size, encrypted."""
    topo = routed_attack
    daemons = _daemons(topo, tmp_path)
    b_ip = topo.addresses["b"]
    pcap = tmp_path / "r.pcap"
    big = secrets.token_bytes(2 * 1024 * 1024)
    router = "10.77.2.254"
    with capture(topo, "r", pcap, ifname="veth-rb"):
        client, server, cport = _connect(topo, tmp_path)
        server.write("send " + big.hex())  # a reads nothing yet: b stalls with its window closed
        time.sleep(2.0)
        last = _last_wire(pcap, b_ip, PORT, min_payload=1)
        snd_nxt = (last[TCP].seq + len(bytes(last[TCP].payload))) & MASK
        quote = bytearray(bytes(last[IP])[:28])
        far = bytearray(quote)
        far[24:28] = ((snd_nxt + 0x20000000) & MASK).to_bytes(4, "big")
        quote[24:28] = snd_nxt.to_bytes(4, "big")  # all sent is acknowledged: snd_una = snd_nxt
        _send_raw(topo, [IP(src=router, dst=b_ip) / ICMP(type=3, code=4, nexthopmtu=600) / bytes(far),
                         IP(src=router, dst=b_ip) / ICMP(type=3, code=4, nexthopmtu=68) / bytes(quote)])
        time.sleep(0.5)
        seen_before = len(_packets(pcap))
        assert client.do(f"wait {len(big)}", timeout=60).startswith("got")
        assert server.line() == "sent"
        counters = daemons["b"].counters()
        sessions = daemons["b"].sessions()
        got = client.close()
        server.close()
    assert got == big
    assert counters.get("icmp_drop", 0) == 1 and counters.get("icmp_rewritten", 0) == 1, counters
    later = _packets(pcap)[seen_before:]  # what left b once the report was taken
    sizes = [len(bytes(p[TCP].payload)) for p in later if TCP in p and p[IP].src == b_ip and len(p[TCP].payload)]
    assert len(sizes) > 100, len(sizes)
    assert 400 < max(sizes) <= 552 - 40, sizes[:40]  # floored at 552, not lowered to 68
    assert not [s for s in sessions if s["state"] == "aborted"]
    _no_leak(pcap, topo, PORT, [big[i : i + 32] for i in range(0, len(big), len(big) // 16)])
    for daemon in daemons.values():
        assert daemon.stop() == 0


@pytest.mark.timeout(180)
def test_idle_expiry_fails_closed(routed_attack: Topology, tmp_path: Path) -> None:
    """b forgets an idle encrypted connection (idle_timeout 2 s): b's next write resets the
    connection instead of leaving in plaintext; a's later frames never reach b's application."""
    topo = routed_attack
    daemons = _daemons(topo, tmp_path, {"b": "idle_timeout = 2.0\n"})
    pcap = tmp_path / "r.pcap"
    first, late_a, late_b = (secrets.token_bytes(2000) for _ in range(3))
    with capture(topo, "r", pcap, ifname="veth-rb"):
        client, server, _ = _connect(topo, tmp_path)
        assert client.do("send " + first.hex()) == "sent"
        assert server.do(f"wait {len(first)}").startswith("got")
        time.sleep(4.5)
        assert daemons["b"].sessions() == []
        assert client.do("send " + late_a.hex()) == "sent"
        time.sleep(1.0)
        server.do("send " + late_b.hex())
        reply = client.do(f"wait {len(late_b)}")
        counters = daemons["b"].counters()
        got_client, got_server = client.close(), server.close()
    assert reply.startswith("error"), reply
    assert got_server == first and got_client == b""
    assert counters.get("fail_closed_reset", 0) >= 1 and counters.get("fail_closed_dropped", 0) >= 1, counters
    _no_leak(pcap, topo, PORT, [first, late_a, late_b])
    for daemon in daemons.values():
        assert daemon.stop() == 0


@pytest.mark.timeout(240)
def test_sigkill_and_restart_mid_transfer(routed_attack: Topology, tmp_path: Path) -> None:
    """b's daemon is killed in the middle of a transfer and started again: no byte of the
    encrypted connection leaves b in plaintext meanwhile or after; a gets a strict prefix of the
    file, never a forged byte; the next connection is encrypted again."""
    topo = routed_attack
    daemons = _daemons(topo, tmp_path)
    a_ip, b_ip = topo.addresses["a"], topo.addresses["b"]
    served = tmp_path / "www"
    served.mkdir()
    markers = make_payload(served / "f", 8 * 1024 * 1024, markers=64)
    # a's stack takes at most ~1 MiB ahead of curl: the file is mostly on b's side at the kill (a
    # fast path would otherwise move it all into a's receive buffer first, and curl would finish)
    topo.check("a", ["sysctl", "-qw", "net.ipv4.tcp_rmem=4096 131072 1048576"])
    pcap = tmp_path / "r.pcap"
    got = tmp_path / "got"
    with capture(topo, "r", pcap, ifname="veth-rb"), http_server(topo, "b", served) as url:
        curl = topo.popen("a", ["curl", "-sS", "--fail", "--limit-rate", "500k", "--max-time", "25",
                                "-o", str(got), f"{url}/f"], stderr=subprocess.PIPE)  # fmt: skip
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (not got.exists() or got.stat().st_size < 1_000_000):
            time.sleep(0.2)
        assert got.exists() and got.stat().st_size >= 1_000_000
        daemons["b"].proc.send_signal(signal.SIGKILL)
        daemons["b"].proc.wait(10)
        time.sleep(3.0)  # b's stack keeps retransmitting: the rules drop it, nothing leaks
        again = tmp_path / "again"
        again.mkdir()
        daemons["b"] = start_daemon(topo, "b", again)
        rc = curl.wait(60)
        counters = daemons["b"].counters()
        fresh = tmp_path / "fresh"
        small = served / "small"
        small_markers = make_payload(small, 200_000)
        result = topo.run("a", ["curl", "-sS", "--fail", "--max-time", "30", "-o", str(fresh), f"{url}/small"],
                          timeout=60)  # fmt: skip
    assert rc != 0, "the transfer cannot survive its daemon's death (no state to go on encrypting)"
    data = (served / "f").read_bytes()
    received = got.read_bytes()
    assert len(received) < len(data) and data.startswith(received), "a got something that is not a prefix"
    assert counters.get("fail_closed_reset", 0) >= 1, counters
    assert result.returncode == 0 and fresh.read_bytes() == small.read_bytes(), result.stderr
    needles = {f"marker{i}": m for i, m in enumerate(markers + small_markers)}
    report = analyze(pcap, a_ip, b_ip, HTTP_PORT, needles)
    assert report.leaks == {}, report.leaks
    for daemon in daemons.values():
        daemon.stop()


# In r: every TCP packet from b to a gets the largest window field, so a's stack ignores b's real
# receive window (a peer that ignores the window, as far as b can tell).
INFLATE_WINDOW = r"""
import struct, sys
from netfilterqueue import NetfilterQueue

def fold(total):
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total

def on_packet(pkt):
    data = bytearray(pkt.get_payload())
    ihl = (data[0] & 15) * 4
    tcp = data[ihl:]
    if len(tcp) >= 20:
        old = struct.unpack_from("!H", tcp, 14)[0]
        check = struct.unpack_from("!H", tcp, 16)[0]
        check = 0xFFFF - fold((0xFFFF - check) + (0xFFFF - old) + 0xFFFF)
        struct.pack_into("!HH", data, ihl + 14, 0xFFFF, check)
        pkt.set_payload(bytes(data))
    pkt.accept()

queue = NetfilterQueue()
queue.bind(int(sys.argv[1]), on_packet)
print("ready", flush=True)
queue.run()
"""


@pytest.mark.timeout(240)
def test_peer_that_ignores_the_window(routed_attack: Topology, tmp_path: Path, queue_backend: str) -> None:
    """a's stack is made to ignore b's receive window (r inflates b's window field): b's daemon
    takes nothing beyond the window b's stack advertised but the rest of one frame begun inside it,
    so what it holds stays bounded while b's application reads nothing; then b reads everything,
    intact (a frame cut at the edge stalled the connection for good in about one run in ten)."""
    topo = routed_attack
    daemons = _daemons(topo, tmp_path)
    b_ip = topo.addresses["b"]
    topo.check("r", ["iptables", "-A", "FORWARD", "-p", "tcp", "-s", b_ip, "-j", "NFQUEUE", "--queue-num", "77"])
    inflater = topo.popen("r", [sys.executable, "-u", "-c", INFLATE_WINDOW, "77"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    assert inflater.stdout is not None and inflater.stdout.readline().strip() == "ready"
    # a's stack is the one that misbehaves here, and its congestion control is not what is tested:
    # with BBR (this machine's default) the segments b's daemon drops beyond the window while b
    # reads nothing made a's pacing rate collapse to a few kbit/s in about half the runs, and the
    # transfer then outlived the test. Reno: a namespace may pick only an allowed algorithm.
    topo.check("a", ["sysctl", "-q", "-w", "net.ipv4.tcp_congestion_control=reno"])
    data = secrets.token_bytes(16 * 1024 * 1024)
    held = []
    client, server, _ = _connect(topo, tmp_path)
    client.write("send " + data.hex())  # b's application reads nothing for a while
    for _ in range(8):
        time.sleep(0.5)
        held.append(_session(daemons["b"], PORT)["held_bytes"])
    assert server.do(f"wait {len(data)}", timeout=120).startswith("got")
    assert client.line(timeout=60) == "sent"
    client.close()
    got = server.close()
    assert got == data
    # Once b's stack has taken what it could (its buffer is full), the daemon holds at most the
    # plaintext of the one frame that began inside b's window, kept for redelivery: what a sent
    # beyond that window and that frame was not taken. Frames are one segment on NetfilterQueue
    # and up to a super-packet on the fast backend (without the edge: ~60 kB on either).
    assert max(held[-4:]) <= (0xFFFF if queue_backend == "fast" else 1448), held
    for daemon in daemons.values():
        assert daemon.stop() == 0
