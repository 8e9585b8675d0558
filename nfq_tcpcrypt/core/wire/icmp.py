"""ICMP and ICMPv6 error messages that quote a TCP segment (RFC 792, RFC 1191, RFC 4443 §3).

The quote starts at the offending packet's IP header; its TCP header's first 8 bytes (ports and
sequence number) are all the engine needs, and all it lets through toward the wire.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from ..errors import MalformedSegment
from .ip import checksum_fold, finish_checksum, pseudo_header_sum, serialize_ip_header

IPPROTO_ICMP: Final = 1
IPPROTO_ICMPV6: Final = 58
# Error types: RFC 792 (unreachable 3, time exceeded 11, parameter problem 12) and RFC 4443 §3
# (unreachable 1, packet too big 2, time exceeded 3, parameter problem 4).
ICMP_ERRORS: Final = {3, 11, 12}
ICMPV6_ERRORS: Final = {1, 2, 3, 4}


@dataclass(slots=True)
class IcmpError:
    """An ICMP(v6) error; `word` is the 32-bit field after the checksum (MTU, pointer, unused)."""

    ip_header: bytes
    src: bytes
    dst: bytes
    icmp_type: int
    code: int
    word: int
    quote: bytes

    @property
    def is_too_big(self) -> bool:
        """Fragmentation needed (RFC 1191) or packet too big (RFC 4443 §3.2)."""
        if len(self.src) == 4:
            return self.icmp_type == 3 and self.code == 4
        return self.icmp_type == 2

    @property
    def mtu(self) -> int:
        """The next-hop MTU of a too-big message (16 bits in ICMP, 32 in ICMPv6)."""
        return self.word & 0xFFFF if len(self.src) == 4 else self.word

    @mtu.setter
    def mtu(self, value: int) -> None:
        self.word = value & 0xFFFF if len(self.src) == 4 else value

    @property
    def quoted_tcp(self) -> tuple[bytes, bytes, int, int, int, int]:
        """(src, dst, sport, dport, seq offset in the quote, seq) of the quoted TCP segment."""
        q = self.quote
        if len(q) >= 20 and q[0] >> 4 == 4:
            ihl = (q[0] & 0x0F) * 4
            if q[9] != 6 or len(q) < ihl + 8:
                raise MalformedSegment("icmp quote is not tcp")
            src, dst = q[12:16], q[16:20]
        elif len(q) >= 48 and q[0] >> 4 == 6 and q[6] == 6:
            ihl = 40
            src, dst = q[8:24], q[24:40]
        else:
            raise MalformedSegment("icmp quote is not tcp")
        sport, dport, seq = struct.unpack_from("!HHI", q, ihl)
        return src, dst, sport, dport, ihl + 4, seq


def parse_icmp_error(packet: bytes) -> IcmpError | None:
    """Decode an ICMP or ICMPv6 error message; None for any other packet."""
    version = packet[0] >> 4 if packet else 0
    if version == 4 and len(packet) >= 20 and packet[9] == IPPROTO_ICMP:
        ihl = (packet[0] & 0x0F) * 4
        if len(packet) < ihl + 8 + 28 or packet[ihl] not in ICMP_ERRORS:
            return None
        icmp_type, code, word = struct.unpack_from("!BB2xI", packet, ihl)
        return IcmpError(packet[:ihl], packet[12:16], packet[16:20], icmp_type, code, word, packet[ihl + 8 :])
    if version == 6 and len(packet) >= 40 + 8 + 48 and packet[6] == IPPROTO_ICMPV6:
        icmp_type, code, word = struct.unpack_from("!BB2xI", packet, 40)
        if icmp_type not in ICMPV6_ERRORS:
            return None
        return IcmpError(packet[:40], packet[8:24], packet[24:40], icmp_type, code, word, packet[48:])
    return None


def serialize_icmp_error(msg: IcmpError) -> bytes:
    """Rebuild the message with its (possibly rewritten) word and quote, and a fresh checksum."""
    body = bytearray(struct.pack("!BBHI", msg.icmp_type, msg.code, 0, msg.word) + msg.quote)
    if len(msg.src) == 4:
        total = checksum_fold(body)
    else:
        total = pseudo_header_sum(msg.src, msg.dst, len(body), IPPROTO_ICMPV6) + checksum_fold(body)
    struct.pack_into("!H", body, 2, finish_checksum(total))
    return serialize_ip_header(msg.ip_header, len(body)) + bytes(body)
