"""TCP segments (RFC 9293 §3.1) inside their IP packet: strict parsing and rebuilding."""

from __future__ import annotations

import struct
from typing import Final

from ..constants import (
    TCP_ACK,
    TCP_FIN,
    TCP_MAX_OPTIONS,
    TCP_RST,
    TCP_SYN,
    TCPOPT_EOL,
    TCPOPT_MSS,
    TCPOPT_NOP,
    TCPOPT_SACK,
    TCPOPT_TIMESTAMP,
    TCPOPT_WSCALE,
)
from ..errors import MalformedSegment
from .ip import IPPROTO_TCP, new_ip_header, ones_sum, parse_ip, pseudo_header_sum, serialize_ip_header

_TCP: Final = struct.Struct("!HHIIBBHHH")
# Bound once (compiled: no method lookup per call, see ip._FROM_BYTES).
_TCP_PACK: Final = _TCP.pack
_TCP_UNPACK_FROM: Final = _TCP.unpack_from
_V4_TCP_PACK: Final = struct.Struct("!BBHHHBBH8sHHIIBBHHH").pack  # an option-less IPv4 header, then TCP's
_FROM_BYTES: Final = int.from_bytes
_LINUX_TS: Final = bytes((TCPOPT_NOP, TCPOPT_NOP, TCPOPT_TIMESTAMP, 10))
_NOP: Final = bytes((TCPOPT_NOP,))


class Segment:
    """One TCP/IP packet, decoded for rewriting; `serialize_segment` rebuilds it with checksums.

    `gso`: a super-packet the kernel segments after the verdict (docs/architecture.md: Sizes);
    `kernel_checksum`: the kernel computes the TCP checksum of the rewritten packet itself (an
    outbound super-packet, segmented in software), so `serialize_segment` leaves it out.
    """

    __slots__ = (
        "ip_header", "src", "dst", "sport", "dport", "seq", "ack", "flags", "window", "urgent",
        "options", "payload", "gso", "kernel_checksum", "parsed_ip", "parsed_len",
    )

    def __init__(
        self, ip_header: bytes, src: bytes, dst: bytes, sport: int, dport: int, seq: int, ack: int,
        flags: int, window: int, urgent: int, options: bytes, payload: bytes,
    ) -> None:
        self.ip_header = ip_header
        self.src = src
        self.dst = dst
        self.sport = sport
        self.dport = dport
        self.seq = seq
        self.ack = ack
        self.flags = flags
        self.window = window
        self.urgent = urgent
        self.options = options
        self.payload = payload
        self.gso = False
        self.kernel_checksum = False
        # The IP header and packet length as parsed: a rebuilt packet of that length keeps the
        # header as it came, its checksum the sender's (the kernel verified it before any hook).
        self.parsed_ip: bytes | None = None
        self.parsed_len = 0

    @property
    def is_syn(self) -> bool:
        """SYN flag set (RFC 8547 §3: a "SYN segment")."""
        return bool(self.flags & TCP_SYN)

    @property
    def is_ack(self) -> bool:
        """ACK flag set."""
        return bool(self.flags & TCP_ACK)

    @property
    def is_fin(self) -> bool:
        """FIN flag set."""
        return bool(self.flags & TCP_FIN)

    @property
    def is_rst(self) -> bool:
        """RST flag set."""
        return bool(self.flags & TCP_RST)


def parse_segment(packet: bytes, verify_checksum: bool = False) -> Segment:
    """Decode an IP packet carrying TCP; raise MalformedSegment on anything inconsistent."""
    n = len(packet)
    if n >= 40 and packet[0] == 0x45:
        # The usual packet: IPv4 without options, parse_ip's checks and the TCP header read byte
        # by byte (compiled, bytes indexing makes no object: a struct unpack made 19).
        if (packet[2] << 8) | packet[3] != n or packet[6] & 0x3F or packet[7] or packet[9] != IPPROTO_TCP:
            parse_ip(packet)  # raises with the reason
        doff = (packet[32] >> 4) * 4
        if doff < 20 or 20 + doff > n:
            raise MalformedSegment(f"tcp data offset {doff} for {n - 20} bytes")
        src, dst = packet[12:16], packet[16:20]
        if verify_checksum and _segment_sum(packet, 20, src, dst) != 0:
            raise MalformedSegment("tcp checksum mismatch")
        seg = Segment(
            packet[:20], src, dst, (packet[20] << 8) | packet[21], (packet[22] << 8) | packet[23],
            (packet[24] << 24) | (packet[25] << 16) | (packet[26] << 8) | packet[27],
            (packet[28] << 24) | (packet[29] << 16) | (packet[30] << 8) | packet[31],
            packet[33], (packet[34] << 8) | packet[35], (packet[38] << 8) | packet[39],
            packet[40 : 20 + doff], packet[20 + doff :],
        )
        seg.parsed_ip, seg.parsed_len = seg.ip_header, n
        return seg
    _, ihl, src, dst = parse_ip(packet)
    if len(packet) - ihl < 20:
        raise MalformedSegment(f"tcp header truncated: {len(packet) - ihl} bytes")
    sport, dport, seq, ack, offset, flags, window, csum, urgent = _TCP_UNPACK_FROM(packet, ihl)
    doff = (offset >> 4) * 4
    if doff < 20 or ihl + doff > len(packet):
        raise MalformedSegment(f"tcp data offset {doff} for {len(packet) - ihl} bytes")
    if verify_checksum and _segment_sum(packet, ihl, src, dst) != 0:
        raise MalformedSegment("tcp checksum mismatch")
    seg = Segment(
        packet[:ihl], src, dst, sport, dport, seq, ack, flags, window, urgent, packet[ihl + 20 : ihl + doff],
        packet[ihl + doff :],
    )
    seg.parsed_ip, seg.parsed_len = seg.ip_header, len(packet)
    return seg


def _segment_sum(packet: bytes, ihl: int, src: bytes, dst: bytes) -> int:
    """The TCP checksum sum of a whole packet with its pseudo-header, mod 0xFFFF: 0 when the
    checksum is right (RFC 1071, RFC 9293 §3.1). In an option-less IPv4 header and in IPv6 the
    addresses sit right before the TCP header, so one sum from the source address covers both
    (an IPv4 header with options has them between: its pseudo-header is summed apart)."""
    tcp_len = len(packet) - ihl
    at = 12 if ihl == 20 else 8 if packet[0] >> 4 == 6 else -1
    if at < 0:
        return (pseudo_header_sum(src, dst, tcp_len) + ones_sum(packet, ihl)) % 0xFFFF
    return (ones_sum(packet, at) + IPPROTO_TCP + tcp_len) % 0xFFFF


def serialize_segment(seg: Segment) -> bytes:
    """Rebuild the packet of `seg` with fresh lengths and IP/TCP checksums (the TCP checksum
    field left 0 when `seg.kernel_checksum`: the kernel's segmentation writes it)."""
    options = seg.options
    if len(options) & 3:
        options = options + bytes(4 - (len(options) & 3))  # EOL padding
    payload = seg.payload
    doff = 20 + len(options)
    tcp_len = doff + len(payload)
    seq, ack, offset = seg.seq & 0xFFFFFFFF, seg.ack & 0xFFFFFFFF, (doff // 4) << 4
    ip = seg.ip_header
    csum = 0
    if not seg.kernel_checksum:
        # The pseudo-header (addresses, protocol, length), the header's 16-bit words (checksum 0),
        # the options and the payload, each 16-bit aligned, summed mod 0xFFFF (RFC 9293 §3.1).
        src, dst = seg.src, seg.dst
        total = (_words(src, 0, len(src)) + _words(dst, 0, len(dst)) + IPPROTO_TCP + tcp_len
                 + seg.sport + seg.dport + (seq >> 16) + (seq & 0xFFFF) + (ack >> 16) + (ack & 0xFFFF)
                 + ((offset << 8) | seg.flags) + seg.window + seg.urgent + _words(options, 0, len(options)))
        if payload:
            total += ones_sum(payload)
        csum = ~(total % 0xFFFF or 0xFFFF) & 0xFFFF
    if seg.parsed_ip is not ip or seg.parsed_len != len(ip) + tcp_len:
        if len(ip) == 20 and ip[0] == 0x45:
            # An option-less IPv4 header with a new length: both headers in one pack, the IP
            # checksum from the header's words and the new length (RFC 1071).
            length = 20 + tcp_len
            ip_sum = (0x4500 | ip[1]) + length + _words(ip, 4, 10) + _words(ip, 12, 20)
            head = _V4_TCP_PACK(0x45, ip[1], length, (ip[4] << 8) | ip[5], (ip[6] << 8) | ip[7], ip[8], ip[9],
                                ~(ip_sum % 0xFFFF or 0xFFFF) & 0xFFFF, ip[12:20], seg.sport, seg.dport, seq, ack,
                                offset, seg.flags, seg.window, csum, seg.urgent)
            return b"".join((head, options, payload))
        ip = serialize_ip_header(ip, tcp_len)
    header = _TCP_PACK(seg.sport, seg.dport, seq, ack, offset, seg.flags, seg.window, csum, seg.urgent)
    return b"".join((ip, header, options, payload))


def _words(data: bytes, start: int, end: int) -> int:
    """Sum of the big-endian 16-bit words of `data[start:end]`, an even number of bytes (an
    address, an options block, part of a header), not folded (RFC 1071). Compiled, the sum of a
    short run stays a small int: no object made, where a big integer of the bytes made several."""
    total = 0
    for i in range(start, end - 1, 2):
        total += (data[i] << 8) | data[i + 1]
    return total


def new_segment(
    src: bytes, dst: bytes, sport: int, dport: int, seq: int, ack: int, flags: int, window: int,
    options: bytes = b"", payload: bytes = b"",
) -> Segment:
    """A segment built from scratch (for injection)."""
    return Segment(new_ip_header(src, dst), src, dst, sport, dport, seq, ack, flags, window, 0,
                   options, payload)


def usual_options(options: bytes) -> bool:
    """Timestamps in the form Linux sends them on every segment (NOP, NOP, TS; RFC 7323 §3), or
    no options: the usual options block of an established connection."""
    return not options or (len(options) == 12 and options[0] == TCPOPT_NOP and options[1] == TCPOPT_NOP
                           and options[2] == TCPOPT_TIMESTAMP and options[3] == 10)


def usual_tsval(options: bytes) -> int:
    """The TSval of a usual options block that holds timestamps (usual_options, 12 bytes)."""
    return (options[4] << 24) | (options[5] << 16) | (options[6] << 8) | options[7]


def parse_options(options: bytes) -> list[tuple[int, bytes]]:
    """Split a TCP options block into (kind, whole option bytes), strictly (RFC 9293 §3.1).

    Rejects lengths below 2 and options that overrun the block; stops at EOL.
    """
    n = len(options)
    if n == 12 and options[:4] == _LINUX_TS:
        return [(TCPOPT_NOP, _NOP), (TCPOPT_NOP, _NOP), (TCPOPT_TIMESTAMP, options[2:])]  # the usual case
    result = []
    i = 0
    if n > TCP_MAX_OPTIONS:
        raise MalformedSegment(f"tcp options of {n} bytes")
    while i < n:
        kind = options[i]
        if kind == TCPOPT_EOL:
            break
        if kind == TCPOPT_NOP:
            result.append((kind, options[i : i + 1]))
            i += 1
            continue
        if i + 1 >= n:
            raise MalformedSegment(f"tcp option {kind} has no length byte")
        length = options[i + 1]
        if length < 2 or i + length > n:
            raise MalformedSegment(f"tcp option {kind} length {length} overruns the header")
        result.append((kind, options[i : i + length]))
        i += length
    return result


def serialize_options(options: list[tuple[int, bytes]]) -> bytes:
    """Join options and pad with NOPs to a multiple of 4 bytes; raise if over 40 bytes."""
    data = b"".join(raw for _, raw in options)
    if len(data) & 3:
        data = bytes((TCPOPT_NOP,)) * (4 - (len(data) & 3)) + data
    if len(data) > TCP_MAX_OPTIONS:
        raise MalformedSegment(f"tcp options of {len(data)} bytes do not fit")
    return data


def clamp_mss(options: list[tuple[int, bytes]], reduction: int) -> list[tuple[int, bytes]]:
    """Lower the MSS option by `reduction` bytes (the frame overhead, docs/architecture.md "Sizes")."""
    out = []
    for kind, raw in options:
        if kind == TCPOPT_MSS and len(raw) == 4:
            (mss,) = struct.unpack_from("!H", raw, 2)
            raw = struct.pack("!BBH", TCPOPT_MSS, 4, max(mss - reduction, 64))
        out.append((kind, raw))
    return out


def timestamp(options: list[tuple[int, bytes]]) -> tuple[int, int] | None:
    """(TSval, TSecr) of the RFC 7323 timestamp option, or None."""
    for kind, raw in options:
        if kind == TCPOPT_TIMESTAMP and len(raw) == 10:
            tsval, tsecr = struct.unpack_from("!II", raw, 2)
            return tsval, tsecr
    return None


def timestamp_option(tsval: int, tsecr: int) -> bytes:
    """NOP NOP TS(tsval, tsecr): the 12-byte form Linux sends."""
    return struct.pack("!BBBBII", TCPOPT_NOP, TCPOPT_NOP, TCPOPT_TIMESTAMP, 10, tsval, tsecr)


def sack_pairs(option: bytes) -> list[tuple[int, int]]:
    """The (left, right) sequence pairs of a SACK option (RFC 2018 §3)."""
    pairs = []
    for i in range(2, len(option) - 7, 8):
        left, right = struct.unpack_from("!II", option, i)
        pairs.append((left, right))
    return pairs


def with_sack(options: list[tuple[int, bytes]], blocks: list[tuple[int, int]], limit: int = TCP_MAX_OPTIONS) -> bytes:
    """Serialize `options` plus as many of the SACK blocks (sequence pairs, the first ones first) as
    fit in `limit` bytes, at most 40 (RFC 2018 §3)."""
    used = sum(len(option) for _, option in options)
    n = min(len(blocks), 4)
    while n and (used + 2 + 8 * n + 3) // 4 * 4 > min(limit, TCP_MAX_OPTIONS):
        n -= 1
    if n:
        body = b"".join(struct.pack("!II", lo, hi) for lo, hi in blocks[:n])
        options = options + [(TCPOPT_SACK, bytes((TCPOPT_SACK, 2 + 8 * n)) + body)]
    return serialize_options(options)


def window_scale(options: list[tuple[int, bytes]]) -> int | None:
    """The shift of the window-scale option (RFC 7323 §2.2, at most 14), or None."""
    for kind, raw in options:
        if kind == TCPOPT_WSCALE and len(raw) == 3:
            return min(raw[2], 14)
    return None


def mss(options: list[tuple[int, bytes]]) -> int | None:
    """The MSS option's value, or None."""
    for kind, raw in options:
        if kind == TCPOPT_MSS and len(raw) == 4:
            return int(struct.unpack_from("!H", raw, 2)[0])
    return None
