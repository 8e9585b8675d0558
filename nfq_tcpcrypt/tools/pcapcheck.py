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
    """Check the capture of one connection client -> server:server_port for ENO, Init magics, leaks.

    The streams are those of the last connection whose SYN was captured; with several connections
    (client ports) each is reassembled on its own, and leaks are counted in every one of them and in
    the raw capture."""
    report = WireReport()
    to_server: dict[int, list[Segment]] = {}
    to_client: dict[int, list[Segment]] = {}
    client_isns: dict[int, int] = {}
    server_isns: dict[int, int] = {}
    last_port: int | None = None
    last_synack_port: int | None = None
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
                to_server.setdefault(seg.sport, []).append(seg)
                if seg.flags & SYN and not seg.flags & ACK:
                    client_isns[seg.sport] = seg.seq
                    last_port = seg.sport
                    report.syn_has_eno = _has_eno(seg)
            elif seg.src == s and seg.dst == c and seg.sport == server_port:
                to_client.setdefault(seg.dport, []).append(seg)
                if seg.flags & SYN and seg.flags & ACK:
                    server_isns[seg.dport] = seg.seq
                    last_synack_port = seg.dport
                    report.synack_has_eno = _has_eno(seg)
    if last_port is None:
        last_port = last_synack_port
    streams: list[bytes] = []
    for port in dict.fromkeys([*client_isns, *server_isns]):
        client_stream = _reassemble(to_server.get(port, []), client_isns.get(port))
        server_stream = _reassemble(to_client.get(port, []), server_isns.get(port))
        if port == last_port:
            report.client_stream, report.server_stream = client_stream, server_stream
        streams += (client_stream, server_stream)
    raw = pcap.read_bytes()
    for name, needle in needles.items():
        count = raw.count(needle) + sum(stream.count(needle) for stream in streams)
        if count:
            report.leaks[name] = count
    return report
