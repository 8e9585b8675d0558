"""Captures for the decode tests, built from the real protocol bytes of the in-memory engine pair.

scapy writes the files (pcap with linktype 101 for raw IP; pcapng through
RawPcapNgWriter); the packets come from `nfq_tcpcrypt.lab.tcpmodel.Pair`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

from scapy.utils import PcapWriter, RawPcapNgWriter

from nfq_tcpcrypt.core.wire.tcp import parse_segment, serialize_segment
from nfq_tcpcrypt.lab.tcpmodel import A_IP, Pair, seeded_config

MASK = 0xFFFFFFFF


@dataclass
class Session:
    """One connection run through the engine pair: its packets, key log and the data sent."""

    pair: Pair
    wire: list[bytes]
    keylog: list[str]
    a_data: bytes
    b_data: bytes
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def session_id(self) -> str:
        """Session ID (hex) as the engines report it."""
        assert self.pair.engine_a is not None
        return str(self.pair.engine_a.session_table()[0]["session_id"])

    def write_keylog(self, path: Path) -> str:
        """Write the key log lines (with a comment, as the daemon does) and return the path."""
        path.write_text("# nfq-tcpcrypt key log\n" + "\n".join(self.keylog) + "\n")
        return str(path)


def run_session(a_data: bytes, b_data: bytes = b"", seed: bytes = b"decode", engines: bool = True,
                a_engine: bool = True, b_engine: bool = True) -> Session:
    """Connect A to B:80, send a_data and b_data, close both ways; return what crossed the wire."""
    log: list[str] = []
    pair = Pair(
        a_config=seeded_config(seed + b"a", secrets_log=log.append),
        b_config=seeded_config(seed + b"b", secrets_log=log.append),
        a_engine=engines and a_engine, b_engine=engines and b_engine,
    )
    pair.open()
    pair.talk(a_data, b_data)
    pair.close()
    assert bytes(pair.b.received) == a_data and bytes(pair.a.received) == b_data
    return Session(pair, list(pair.wire), sorted(set(log)), a_data, b_data)


def write_pcap(path: Path, packets: list[bytes], linktype: int = 101) -> str:
    """Raw IP packets (or frames for `linktype`) into a classic pcap."""
    writer = PcapWriter(str(path), linktype=linktype, sync=False)
    for packet in packets:
        writer.write(packet)
    writer.close()
    return str(path)


def write_pcapng(path: Path, packets: list[bytes], linktype: int = 101) -> str:
    """The same, as pcapng."""
    writer = RawPcapNgWriter(str(path))
    writer.linktype = linktype
    for packet in packets:
        writer.write(packet)
    writer.close()
    return str(path)


def ethernet(packet: bytes) -> bytes:
    """Wrap an IP packet in an Ethernet II header, with an 802.1Q tag to be thorough."""
    ethertype = 0x0800 if packet[0] >> 4 == 4 else 0x86DD
    macs = b"\x02\x00\x00\x00\x00\x02" + b"\x02\x00\x00\x00\x00\x01"
    return macs + struct.pack("!HHH", 0x8100, 7, ethertype) + packet


def sll(packet: bytes) -> bytes:
    """Linux cooked capture v1 (linktype 113)."""
    ethertype = 0x0800 if packet[0] >> 4 == 4 else 0x86DD
    return struct.pack("!HHH8sH", 0, 1, 6, b"\x02\x00\x00\x00\x00\x01\x00\x00", ethertype) + packet


def sll2(packet: bytes) -> bytes:
    """Linux cooked capture v2 (linktype 276)."""
    ethertype = 0x0800 if packet[0] >> 4 == 4 else 0x86DD
    return struct.pack("!HHIHBB8s", ethertype, 0, 2, 1, 0, 6, b"\x02\x00\x00\x00\x00\x01\x00\x00") + packet


def to_ipv6(packet: bytes, hop_by_hop: bool = False) -> bytes:
    """The same TCP segment in an IPv6 packet (fd00::1 / fd00::2); the TCP checksum is left stale."""
    ihl = (packet[0] & 0x0F) * 4
    tcp = packet[ihl:]
    src = b"\xfd" + bytes(14) + packet[15:16]
    dst = b"\xfd" + bytes(14) + packet[19:20]
    ext = b""
    nxt = 6
    if hop_by_hop:
        ext = bytes((6, 0)) + b"\x01\x04\x00\x00\x00\x00"  # next=TCP, len 0, PadN
        nxt = 0
    return struct.pack("!IHBB", 6 << 28, len(ext) + len(tcp), nxt, 64) + src + dst + ext + tcp


def segments(wire: list[bytes]) -> list:
    """The parsed segments of a packet list."""
    return [parse_segment(p) for p in wire]


def data_packets(wire: list[bytes], src: bytes = A_IP) -> list[int]:
    """Indexes of the packets from `src` that carry payload."""
    return [i for i, p in enumerate(wire) if parse_segment(p).src == src and parse_segment(p).payload]


def stream_offset(wire: list[bytes], index: int) -> int:
    """Stream offset (from ISN+1) of the first payload byte of wire[index]."""
    seg = parse_segment(wire[index])
    syn = next(s for s in segments(wire) if s.is_syn and s.src == seg.src)
    return (seg.seq - syn.seq - 1) & MASK


def with_payload(packet: bytes, payload: bytes, options: bytes | None = None) -> bytes:
    """The packet rebuilt with another payload (and options), checksums fixed."""
    seg = parse_segment(packet)
    seg.payload = payload
    if options is not None:
        seg.options = options
    return serialize_segment(seg)
