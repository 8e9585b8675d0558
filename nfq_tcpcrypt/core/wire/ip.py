"""IPv4 (RFC 791) and IPv6 (RFC 8200) headers of TCP packets, and the ones'-complement checksum."""

from __future__ import annotations

import struct
from typing import Final

from ..errors import MalformedSegment

IPPROTO_TCP: Final = 6
_V6_HEADER_LEN: Final = 40
# Bound once: compiled, a call through a module constant skips the attribute lookup and the
# bound method that `int.from_bytes(...)` makes on every call.
_FROM_BYTES: Final = int.from_bytes


def ones_sum(data: bytes, start: int = 0) -> int:
    """Sum of the big-endian 16-bit words of `data[start:]` mod 0xFFFF, an odd last byte padded
    with zero (RFC 1071 §4.1); 0..0xFFFE, where 0 also stands for a sum of 0xFFFF.

    A 16-bit aligned run of words as one big-endian number is their sum mod 0xFFFF (2**16 == 1
    mod 0xFFFF, RFC 1071 §2): pieces of the buffer convert and add as numbers, and one division
    by 0xFFFF folds the total. The division goes digit by digit, so pieces keep the total small:
    pieces of about the square root of 64 times the length cost least (each costs a slice and a
    conversion; 256 bytes for a 1,460-byte packet, 2 KiB for a 64 KiB super-packet).
    """
    n = len(data) - start
    if n <= 512:
        x = _FROM_BYTES(data[start:] if start else data, "big")
        return (x << 8 if n & 1 else x) % 0xFFFF
    piece = 256 if n <= 4096 else 1024 if n <= 16384 else 2048
    end = len(data)
    total = 0
    at = start
    while end - at > piece:
        total += _FROM_BYTES(data[at : at + piece], "big")
        at += piece
    x = _FROM_BYTES(data[at:], "big")
    return (total + (x << 8 if n & 1 else x)) % 0xFFFF


def checksum_fold(data: bytes | bytearray | memoryview) -> int:
    """Ones'-complement sum of big-endian 16-bit words, folded into 1..0xFFFF (RFC 1071)."""
    return ones_sum(data if isinstance(data, bytes) else bytes(data)) or 0xFFFF


def finish_checksum(total: int) -> int:
    """Turn a sum of folds into the 16-bit checksum field value."""
    return ~(total % 0xFFFF or 0xFFFF) & 0xFFFF


def parse_ip(packet: bytes) -> tuple[int, int, bytes, bytes]:
    """Return (version, header_len, src, dst) of an IP packet that carries TCP.

    Raises MalformedSegment for anything else: lengths that lie, fragments, IPv6 extension headers.
    """
    if len(packet) < 20:
        raise MalformedSegment(f"ip packet of {len(packet)} bytes is too short")
    version = packet[0] >> 4
    if version == 4:
        ihl = (packet[0] & 0x0F) * 4
        total, frag, proto = struct.unpack_from("!H2xH1xB", packet, 2)
        if ihl < 20 or total < ihl or total != len(packet):
            raise MalformedSegment(f"ipv4 ihl {ihl} / total length {total} for {len(packet)} bytes")
        if frag & 0x3FFF:
            raise MalformedSegment("ipv4 fragment")
        if proto != IPPROTO_TCP:
            raise MalformedSegment(f"ipv4 protocol {proto} is not tcp")
        return 4, ihl, packet[12:16], packet[16:20]
    if version == 6:
        if len(packet) < _V6_HEADER_LEN:
            raise MalformedSegment(f"ipv6 packet of {len(packet)} bytes is too short")
        plen, nxt = struct.unpack_from("!HB", packet, 4)
        if plen + _V6_HEADER_LEN != len(packet):
            raise MalformedSegment(f"ipv6 payload length {plen} for {len(packet)} bytes")
        if nxt != IPPROTO_TCP:
            raise MalformedSegment(f"ipv6 next header {nxt} is not tcp")
        return 6, _V6_HEADER_LEN, packet[8:24], packet[24:40]
    raise MalformedSegment(f"ip version {version}")


_V6_EXTENSIONS: Final = frozenset((0, 43, 60))  # hop-by-hop, routing, destination options (RFC 8200 §4)


def tcp_ports_of(packet: bytes) -> tuple[bytes, int, bytes, int] | None:
    """(src, sport, dst, dport) of a TCP packet `parse_ip` or the TCP codec refuses, where they can
    be found at all: an IPv4 header whatever its length fields say, an IPv6 header past the
    extension headers a host's stack skips (RFC 8200 §4). None when the packet carries no TCP
    ports we can read (a fragment past the first, another protocol, a truncated header)."""
    n = len(packet)
    if n < 20:
        return None
    version = packet[0] >> 4
    if version == 4:
        offset = (packet[0] & 0x0F) * 4
        if packet[9] != IPPROTO_TCP or offset < 20 or struct.unpack_from("!H", packet, 6)[0] & 0x1FFF:
            return None
        src, dst = packet[12:16], packet[16:20]
    elif version == 6 and n >= _V6_HEADER_LEN:
        nxt, offset = packet[6], _V6_HEADER_LEN
        while nxt != IPPROTO_TCP:  # however many headers a stack would skip: each is 8 bytes or more
            if nxt == 44:  # fragment header (RFC 8200 §4.5): ports only in the first fragment
                if offset + 8 > n or struct.unpack_from("!H", packet, offset + 2)[0] & 0xFFF8:
                    return None
                nxt, offset = packet[offset], offset + 8
            elif nxt in _V6_EXTENSIONS or nxt == 51:  # 51: authentication header, 4-byte units
                if offset + 2 > n:
                    return None
                nxt, offset = packet[offset], offset + ((packet[offset + 1] + 2) * 4 if nxt == 51
                                                         else (packet[offset + 1] + 1) * 8)
            else:
                return None
        src, dst = packet[8:24], packet[24:40]
    else:
        return None
    if offset + 4 > n:
        return None
    sport, dport = struct.unpack_from("!HH", packet, offset)
    return src, sport, dst, dport


def pseudo_header_sum(src: bytes, dst: bytes, length: int, proto: int = IPPROTO_TCP) -> int:
    """Sum of the upper-layer pseudo-header (RFC 9293 §3.1, RFC 8200 §8.1), not yet folded.

    The addresses fold as one big integer; protocol and length are 16-bit words of their own (an
    IPv6 length above 65535 spans two words, which `length` as a plain number adds up the same).
    """
    return _FROM_BYTES(src + dst, "big") % 0xFFFF + proto + length


def serialize_ip_header(template: bytes, payload_len: int) -> bytes:
    """Copy an IP header (`template`, options included) with a new length and checksum."""
    if template[0] == 0x45 and len(template) == 20:
        # The usual IPv4 header without options: one concatenation, its checksum from the sum of
        # the words that stay and the new length (RFC 1071).
        total = (20 + payload_len).to_bytes(2, "big")
        rest = template[4:10]
        tail = template[12:20]
        csum = ~((_FROM_BYTES(template[:2] + total + rest + tail, "big") % 0xFFFF) or 0xFFFF) & 0xFFFF
        return template[:2] + total + rest + csum.to_bytes(2, "big") + tail
    header = bytearray(template)
    if header[0] >> 4 == 4:
        struct.pack_into("!H", header, 2, len(header) + payload_len)
        struct.pack_into("!H", header, 10, 0)
        struct.pack_into("!H", header, 10, finish_checksum(checksum_fold(header)))
    else:
        struct.pack_into("!H", header, 4, payload_len)
    return bytes(header)


def new_ip_header(src: bytes, dst: bytes, ttl: int = 64) -> bytes:
    """A fresh option-less IP header from src to dst (lengths filled by serialize_ip_header)."""
    if len(src) == 4:
        # DF set, identification 0: the kernel fills it for raw sockets (raw(7)).
        return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20, 0, 0x4000, ttl, IPPROTO_TCP, 0, src, dst)
    return struct.pack("!IHBB16s16s", 0x60000000, 0, IPPROTO_TCP, ttl, src, dst)


def without_ecn(ip_header: bytes) -> bytes:
    """The header with its ECN field cleared: segments we build are not ECN-capable (RFC 3168 §6.1.4)."""
    header = bytearray(ip_header)
    header[1] &= 0xFC if header[0] >> 4 == 4 else 0xCF
    return bytes(header)
