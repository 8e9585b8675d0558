"""Offline pcap checks: ENO in the handshake, Init magics, plaintext on the wire (RFC 8547 §4, RFC 8548 §4.3).

scapy's `RawPcapReader` only reads the records; headers are parsed here with `struct`, strictly
enough for a capture we made ourselves (scapy's option parsing is lenient).
Offline tool: never on the per-packet path.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field
from pathlib import Path

from scapy.utils import RawPcapReader

ENO_KIND = 69
INIT1_MAGIC = bytes.fromhex("15101a0e")
INIT2_MAGIC = bytes.fromhex("097105e0")
SYN, ACK = 0x02, 0x10
_LINK_OFFSETS = {1: 14, 101: 0, 228: 0, 113: 16, 276: 20}


@dataclass
class Segment:
    """The parts of one captured TCP segment the checks need."""

    src: str
    dst: str
    sport: int
    dport: int
    seq: int
    flags: int
    option_kinds: list[int]
    payload: bytes


@dataclass
class WireReport:
    """What the capture shows about the connection to the server port."""

    packets: int = 0
    syn_has_eno: bool = False
    synack_has_eno: bool = False
    client_stream: bytes = b""
    server_stream: bytes = b""
    leaks: dict[str, int] = field(default_factory=dict)

    @property
    def client_starts_with_init1(self) -> bool:
        """The client's (A's) byte stream starts with the Init1 magic."""
        return self.client_stream[:4] == INIT1_MAGIC

    @property
    def server_starts_with_init2(self) -> bool:
        """The server's (B's) byte stream starts with the Init2 magic."""
        return self.server_stream[:4] == INIT2_MAGIC

    @property
    def any_init_magic(self) -> bool:
        """Either stream starts with an Init magic."""
        return (
            self.client_starts_with_init1
            or self.server_starts_with_init2
            or (
                self.client_stream[:4] in (INIT1_MAGIC, INIT2_MAGIC)
                or self.server_stream[:4] in (INIT1_MAGIC, INIT2_MAGIC)
            )
        )


def _option_kinds(options: bytes) -> list[int]:
    kinds = []
    i = 0
    while i < len(options):
        kind = options[i]
        if kind == 0:
            break
        if kind == 1:
            i += 1
            continue
        if i + 1 >= len(options) or options[i + 1] < 2:
            break
        kinds.append(kind)
        i += options[i + 1]
    return kinds


def parse_segment(frame: bytes, linktype: int) -> Segment | None:
    """Parse one captured frame into a Segment, or None when it is not IPv4/IPv6 TCP."""
    offset = _LINK_OFFSETS.get(linktype)
    if offset is None:
        raise ValueError(f"linktype {linktype} is not supported")
    if linktype == 1:
        ethertype = struct.unpack_from("!H", frame, 12)[0]
        if ethertype not in (0x0800, 0x86DD):
            return None
    ip = frame[offset:]
    if len(ip) < 20:
        return None
    version = ip[0] >> 4
    if version == 4:
        ihl = (ip[0] & 0x0F) * 4
        total = struct.unpack_from("!H", ip, 2)[0]
        if ip[9] != 6:
            return None
        src, dst = str(ipaddress.IPv4Address(ip[12:16])), str(ipaddress.IPv4Address(ip[16:20]))
        tcp = ip[ihl:total]
    elif version == 6:
        if ip[6] != 6:
            return None
        total = 40 + struct.unpack_from("!H", ip, 4)[0]
        src, dst = str(ipaddress.IPv6Address(ip[8:24])), str(ipaddress.IPv6Address(ip[24:40]))
        tcp = ip[40:total]
    else:
        return None
    if len(tcp) < 20:
        return None
    sport, dport, seq = struct.unpack_from("!HHI", tcp, 0)
    doff = (tcp[12] >> 4) * 4
    flags = tcp[13]
    return Segment(src, dst, sport, dport, seq, flags, _option_kinds(tcp[20:doff]), bytes(tcp[doff:]))


def _reassemble(segments: list[Segment], isn: int | None) -> bytes:
    """The byte stream of one direction, placed by sequence number (gaps stay zero)."""
    if isn is None:
        return b""
    stream = bytearray()
    for seg in segments:
        if not seg.payload:
            continue
        start = (seg.seq - isn - 1) % (1 << 32)
        if start > 1 << 30:  # before the ISN: not this connection
            continue
        end = start + len(seg.payload)
        if end > len(stream):
            stream.extend(bytes(end - len(stream)))
        stream[start:end] = seg.payload
    return bytes(stream)


def analyze(pcap: Path, client: str, server: str, server_port: int, needles: dict[str, bytes]) -> WireReport:
    """Check the capture of one connection client -> server:server_port for ENO, Init magics, leaks."""
    report = WireReport()
    to_server: list[Segment] = []
    to_client: list[Segment] = []
    client_isn = server_isn = None
    with RawPcapReader(str(pcap)) as reader:
        linktype = reader.linktype
        for frame, _meta in reader:
            seg = parse_segment(frame, linktype)
            if seg is None:
                continue
            report.packets += 1
            if seg.src == client and seg.dst == server and seg.dport == server_port:
                to_server.append(seg)
                if seg.flags & SYN and not seg.flags & ACK:
                    client_isn = seg.seq
                    report.syn_has_eno = ENO_KIND in seg.option_kinds
            elif seg.src == server and seg.dst == client and seg.sport == server_port:
                to_client.append(seg)
                if seg.flags & SYN and seg.flags & ACK:
                    server_isn = seg.seq
                    report.synack_has_eno = ENO_KIND in seg.option_kinds
    report.client_stream = _reassemble(to_server, client_isn)
    report.server_stream = _reassemble(to_client, server_isn)
    raw = pcap.read_bytes()
    for name, needle in needles.items():
        count = raw.count(needle) + report.client_stream.count(needle) + report.server_stream.count(needle)
        if count:
            report.leaks[name] = count
    return report
