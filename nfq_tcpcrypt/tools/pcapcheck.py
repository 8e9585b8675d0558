"""Offline pcap checks: ENO in the handshake, Init magics, plaintext on the wire (RFC 8547 §4, RFC 8548 §4.3).

The capture is read with `pcapread` (the one pcap reader of the tools) and its segments parsed with
the core's strict codecs. Offline tool: never on the per-packet path.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import MalformedSegment
from ..core.seqmap import to_offset
from ..core.wire.tcp import Segment, parse_options, parse_segment
from .pcapread import CaptureReader, ip_packet

ENO_KIND = 69
INIT1_MAGIC = bytes.fromhex("15101a0e")
INIT2_MAGIC = bytes.fromhex("097105e0")
SYN, ACK = 0x02, 0x10


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


def _has_eno(seg: Segment) -> bool:
    try:
        return any(kind == ENO_KIND for kind, _ in parse_options(seg.options))
    except MalformedSegment:
        return False


def _reassemble(segments: list[Segment], isn: int | None) -> bytes:
    """The byte stream of one direction, placed by sequence number (gaps stay zero)."""
    if isn is None:
        return b""
    stream = bytearray()
    for seg in segments:
        if not seg.payload:
            continue
        start = to_offset(seg.seq, isn + 1, 0)
        if start < 0:  # before the ISN: not this connection
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
    c, s = ipaddress.ip_address(client).packed, ipaddress.ip_address(server).packed
    with CaptureReader(str(pcap)) as reader:
        for record in reader:
            ip, _problem = ip_packet(record)
            if ip is None:
                continue
            try:
                seg = parse_segment(ip)
            except MalformedSegment:
                continue
            report.packets += 1
            if seg.src == c and seg.dst == s and seg.dport == server_port:
                to_server.append(seg)
                if seg.flags & SYN and not seg.flags & ACK:
                    client_isn = seg.seq
                    report.syn_has_eno = _has_eno(seg)
            elif seg.src == s and seg.dst == c and seg.sport == server_port:
                to_client.append(seg)
                if seg.flags & SYN and seg.flags & ACK:
                    server_isn = seg.seq
                    report.synack_has_eno = _has_eno(seg)
    report.client_stream = _reassemble(to_server, client_isn)
    report.server_stream = _reassemble(to_client, server_isn)
    raw = pcap.read_bytes()
    for name, needle in needles.items():
        count = raw.count(needle) + report.client_stream.count(needle) + report.server_stream.count(needle)
        if count:
            report.leaks[name] = count
    return report
