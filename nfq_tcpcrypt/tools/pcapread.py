"""Streaming pcap / pcapng reader and link-layer stripping for the offline tools.

A small reader of our own instead of scapy's `RawPcapReader`: it reads one record at a time (never
the whole file), and every malformed thing (a truncated record, an unknown block, an unsupported
link type, a packet cut by the snap length) becomes a `Problem` instead of an exception, so that
`decode` can report it and go on.

Link types: Ethernet (1, with 802.1Q/802.1ad tags), BSD null/loop (0, 108), raw IP (101, 228 IPv4,
229 IPv6), Linux cooked SLL (113) and SLL2 (276). IPv6 extension headers are skipped (the core's
strict `parse_ip` accepts TCP directly after the fixed header only).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

PCAP_MAGICS = {
    b"\xd4\xc3\xb2\xa1": ("<", 1e-6), b"\xa1\xb2\xc3\xd4": (">", 1e-6),
    b"\x4d\x3c\xb2\xa1": ("<", 1e-9), b"\xa1\xb2\x3c\x4d": (">", 1e-9),
}
PCAPNG_SHB = 0x0A0D0D0A
PCAPNG_BYTE_ORDER = 0x1A2B3C4D
MAX_RECORD = 1 << 18  # larger records are reported as corrupt (snaplen is at most 262144)

LINKTYPE_NULL = 0
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
LINKTYPE_LOOP = 108
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
LINKTYPE_LINUX_SLL2 = 276
_ETHERTYPE_IP = (0x0800, 0x86DD)
_VLAN = (0x8100, 0x88A8, 0x9100)
_V6_EXTENSIONS = (0, 43, 60, 51)  # hop-by-hop, routing, destination options, AH
_V6_FRAGMENT = 44


@dataclass(frozen=True, slots=True)
class Problem:
    """Something wrong in the capture, at a 1-based packet number (0: the file itself)."""

    packet: int
    kind: str
    message: str


@dataclass(frozen=True, slots=True)
class Record:
    """One captured frame: its number, time, link type and bytes as captured."""

    number: int
    time: float
    linktype: int
    data: bytes
    wirelen: int


class CaptureReader:
    """Iterate the records of a pcap or pcapng file; problems collect in `self.problems`.

    Use as a context manager or call `close()`.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.problems: list[Problem] = []
        self.format = "unknown"
        self.linktypes: set[int] = set()
        self._file: BinaryIO = open(path, "rb")  # noqa: SIM115 - closed by close()
        self._number = 0

    def __enter__(self) -> CaptureReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the file."""
        self._file.close()

    def _problem(self, kind: str, message: str, packet: int | None = None) -> None:
        self.problems.append(Problem(self._number if packet is None else packet, kind, message))

    def __iter__(self) -> Iterator[Record]:
        head = self._file.read(4)
        if head in PCAP_MAGICS:
            self.format = "pcap"
            yield from self._pcap(head)
        elif len(head) == 4 and struct.unpack("<I", head)[0] == PCAPNG_SHB:
            self.format = "pcapng"
            yield from self._pcapng(head)
        else:
            self._problem("not-a-capture", f"file starts with {head.hex() or 'nothing'}, not a pcap or pcapng magic", 0)

    # -- classic pcap ---------------------------------------------------------------------------

    def _pcap(self, magic: bytes) -> Iterator[Record]:
        endian, unit = PCAP_MAGICS[magic]
        rest = self._file.read(20)
        if len(rest) < 20:
            self._problem("truncated-file", "pcap global header truncated", 0)
            return
        linktype = struct.unpack(endian + "I", rest[16:20])[0] & 0x0FFFFFFF
        self.linktypes.add(linktype)
        record = struct.Struct(endian + "IIII")
        read = self._file.read
        while True:
            header = read(16)
            if not header:
                return
            self._number += 1
            if len(header) < 16:
                self._problem("truncated-file", f"record header truncated ({len(header)} of 16 bytes)")
                return
            sec, frac, caplen, wirelen = record.unpack(header)
            if caplen > MAX_RECORD:
                self._problem("corrupt-record", f"record length {caplen} is not plausible; stopping")
                return
            data = read(caplen)
            if len(data) < caplen:
                self._problem("truncated-file", f"record data truncated ({len(data)} of {caplen} bytes)")
                return
            yield Record(self._number, sec + frac * unit, linktype, data, wirelen)

    # -- pcapng ---------------------------------------------------------------------------------

    def _pcapng(self, head: bytes) -> Iterator[Record]:
        endian = "<"
        interfaces: list[tuple[int, float]] = []
        read = self._file.read
        first = True
        while True:
            if not first:
                head = read(4)
                if not head:
                    return
                if len(head) < 4:
                    self._problem("truncated-file", "pcapng block header truncated", 0)
                    return
            first = False
            length_bytes = read(4)
            if len(length_bytes) < 4:
                self._problem("truncated-file", "pcapng block header truncated", 0)
                return
            if struct.unpack("<I", head)[0] == PCAPNG_SHB:
                order = read(4)
                if len(order) < 4:
                    self._problem("truncated-file", "pcapng section header truncated", 0)
                    return
                endian = "<" if struct.unpack("<I", order)[0] == PCAPNG_BYTE_ORDER else ">"
                if struct.unpack(endian + "I", order)[0] != PCAPNG_BYTE_ORDER:
                    self._problem("corrupt-block", f"pcapng byte-order magic {order.hex()}", 0)
                    return
                interfaces = []
                (length,) = struct.unpack(endian + "I", length_bytes)
                body_len = length - 16
                prefix = order
            else:
                (length,) = struct.unpack(endian + "I", length_bytes)
                body_len = length - 12
                prefix = b""
            (block_type,) = struct.unpack(endian + "I", head)
            if length % 4 or body_len < 0 or length > MAX_RECORD + 64:
                self._problem("corrupt-block", f"pcapng block type {block_type:#x} with length {length}; stopping", 0)
                return
            body = read(body_len)
            trailer = read(4)
            if len(body) < body_len or len(trailer) < 4:
                self._problem("truncated-file", f"pcapng block type {block_type:#x} truncated", 0)
                return
            if block_type == PCAPNG_SHB:
                continue
            body = prefix + body
            if block_type == 1:  # interface description
                interfaces.append(self._idb(body, endian))
                continue
            if block_type in (6, 3, 2):
                self._number += 1
                rec = self._packet_block(block_type, body, endian, interfaces)
                if rec is not None:
                    yield rec
            # other blocks (name resolution, statistics, custom...) carry no packets

    def _idb(self, body: bytes, endian: str) -> tuple[int, float]:
        if len(body) < 8:
            self._problem("corrupt-block", "pcapng interface block too short", 0)
            return (-1, 1e-6)
        linktype = struct.unpack_from(endian + "H", body, 0)[0]
        self.linktypes.add(linktype)
        unit = 1e-6
        at = 8
        while at + 4 <= len(body):
            code, size = struct.unpack_from(endian + "HH", body, at)
            if code == 0:
                break
            if code == 9 and size >= 1 and at + 5 <= len(body):
                value = body[at + 4]
                unit = 2.0 ** -(value & 0x7F) if value & 0x80 else 10.0 ** -value
            at += 4 + ((size + 3) & ~3)
        return (linktype, unit)

    def _packet_block(self, block_type: int, body: bytes, endian: str,
                      interfaces: list[tuple[int, float]]) -> Record | None:
        if block_type == 3:  # simple packet block: interface 0, no timestamp
            if len(body) < 4 or not interfaces:
                self._problem("corrupt-block", "simple packet block without interface or length")
                return None
            (wirelen,) = struct.unpack_from(endian + "I", body, 0)
            data = body[4 : 4 + wirelen]
            return Record(self._number, 0.0, interfaces[0][0], data, wirelen)
        if block_type == 6:
            if len(body) < 20:
                self._problem("corrupt-block", "enhanced packet block too short")
                return None
            iface, high, low, caplen, wirelen = struct.unpack_from(endian + "IIIII", body, 0)
            start = 20
        else:  # obsolete packet block
            if len(body) < 20:
                self._problem("corrupt-block", "packet block too short")
                return None
            iface, _drops, high, low, caplen, wirelen = struct.unpack_from(endian + "HHIIII", body, 0)
            start = 20
        if iface >= len(interfaces):
            self._problem("corrupt-block", f"packet names interface {iface}, only {len(interfaces)} described")
            return None
        if start + caplen > len(body):
            self._problem("corrupt-block", f"packet block captured length {caplen} overruns the block")
            return None
        linktype, unit = interfaces[iface]
        return Record(self._number, ((high << 32) | low) * unit, linktype, body[start : start + caplen], wirelen)


def ip_packet(record: Record) -> tuple[bytes | None, Problem | None]:
    """The IP packet inside a captured frame, trimmed to its IP length, or why there is none.

    Returns (None, None) for frames that are simply not IP/TCP (ARP, UDP...); (None, Problem) for
    frames that should be TCP but cannot be read (truncated by the snap length, fragments).
    """
    data = record.data
    lt = record.linktype
    if lt == LINKTYPE_ETHERNET:
        if len(data) < 14:
            return None, None
        at = 12
        (ethertype,) = struct.unpack_from("!H", data, at)
        while ethertype in _VLAN and len(data) >= at + 6:
            at += 4
            (ethertype,) = struct.unpack_from("!H", data, at)
        if ethertype not in _ETHERTYPE_IP:
            return None, None
        ip = data[at + 2 :]
    elif lt in (LINKTYPE_RAW, LINKTYPE_IPV4, LINKTYPE_IPV6):
        ip = data
    elif lt == LINKTYPE_LINUX_SLL:
        if len(data) < 16 or struct.unpack_from("!H", data, 14)[0] not in _ETHERTYPE_IP:
            return None, None
        ip = data[16:]
    elif lt == LINKTYPE_LINUX_SLL2:
        if len(data) < 20 or struct.unpack_from("!H", data, 0)[0] not in _ETHERTYPE_IP:
            return None, None
        ip = data[20:]
    elif lt in (LINKTYPE_NULL, LINKTYPE_LOOP):
        if len(data) < 4:
            return None, None
        family = struct.unpack_from("<I" if lt == LINKTYPE_NULL else "!I", data, 0)[0]
        if family not in (2, 24, 28, 30) and struct.unpack_from(">I", data, 0)[0] not in (2, 24, 28, 30):
            return None, None
        ip = data[4:]
    else:
        return None, Problem(record.number, "unsupported-linktype", f"link type {lt} is not supported")
    return _trim_ip(ip, record.number)


def _trim_ip(ip: bytes, number: int) -> tuple[bytes | None, Problem | None]:
    if not ip:
        return None, None
    version = ip[0] >> 4
    if version == 4:
        if len(ip) < 20:
            return None, Problem(number, "truncated-packet", f"ipv4 header cut at {len(ip)} bytes")
        if ip[9] != 6:
            return None, None
        (total,) = struct.unpack_from("!H", ip, 2)
        if total > len(ip):
            return None, Problem(number, "truncated-packet",
                                 f"ipv4 packet of {total} bytes captured as {len(ip)} (snap length?)")
        if struct.unpack_from("!H", ip, 6)[0] & 0x3FFF:
            return None, Problem(number, "ip-fragment", "ipv4 fragment of a tcp packet (not reassembled)")
        return ip[:total], None
    if version == 6:
        if len(ip) < 40:
            return None, Problem(number, "truncated-packet", f"ipv6 header cut at {len(ip)} bytes")
        plen, nxt = struct.unpack_from("!HB", ip, 4)
        if 40 + plen > len(ip):
            return None, Problem(number, "truncated-packet",
                                 f"ipv6 packet of {40 + plen} bytes captured as {len(ip)} (snap length?)")
        at = 40
        end = 40 + plen
        while nxt in _V6_EXTENSIONS and at + 8 <= end:
            size = (ip[at + 1] + 2) * 4 if nxt == 51 else (ip[at + 1] + 1) * 8
            nxt = ip[at]
            at += size
        if nxt == _V6_FRAGMENT:
            return None, Problem(number, "ip-fragment", "ipv6 fragment (not reassembled)")
        if nxt != 6 or at > end:
            return None, None
        if at == 40:
            return ip[:end], None
        header = bytearray(ip[:40])
        struct.pack_into("!HB", header, 4, end - at, 6)
        return bytes(header) + ip[at:end], None
    return None, None
