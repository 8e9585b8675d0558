"""ICMP "fragmentation needed" (RFC 792, RFC 1191) and ICMPv6 "packet too big" (RFC 4443 §3.2)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..errors import MalformedSegment
from .ip import checksum_fold, finish_checksum, pseudo_header_sum, serialize_ip_header

IPPROTO_ICMP = 1
IPPROTO_ICMPV6 = 58


@dataclass(slots=True)
class TooBig:
    """A path-MTU report quoting one of our TCP segments (the quote starts at its IP header)."""

    ip_header: bytes
    src: bytes
    dst: bytes
    icmp_type: int
    code: int
    mtu: int
    quote: bytes  # the offending packet's IP header and at least 8 bytes of its TCP header

    @property
    def quoted_tcp(self) -> tuple[bytes, bytes, int, int, int, int]:
        """(src, dst, sport, dport, seq offset in the quote, seq) of the quoted TCP segment."""
        q = self.quote
        if q[0] >> 4 == 4:
            ihl = (q[0] & 0x0F) * 4
            if q[9] != 6 or len(q) < ihl + 8:
                raise MalformedSegment("icmp quote is not tcp")
            src, dst = q[12:16], q[16:20]
        else:
            ihl = 40
            if len(q) < 48 or q[6] != 6:
                raise MalformedSegment("icmpv6 quote is not tcp")
            src, dst = q[8:24], q[24:40]
        sport, dport, seq = struct.unpack_from("!HHI", q, ihl)
        return src, dst, sport, dport, ihl + 4, seq


def parse_too_big(packet: bytes) -> TooBig | None:
    """Decode an ICMP frag-needed / ICMPv6 packet-too-big message; None for any other packet."""
    version = packet[0] >> 4 if packet else 0
    if version == 4 and len(packet) >= 20 and packet[9] == IPPROTO_ICMP:
        ihl = (packet[0] & 0x0F) * 4
        if len(packet) < ihl + 8 + 28 or packet[ihl] != 3 or packet[ihl + 1] != 4:
            return None
        (mtu,) = struct.unpack_from("!H", packet, ihl + 6)
        return TooBig(packet[:ihl], packet[12:16], packet[16:20], 3, 4, mtu, packet[ihl + 8 :])
    if version == 6 and len(packet) >= 40 + 8 + 48 and packet[6] == IPPROTO_ICMPV6 and packet[40] == 2:
        (mtu,) = struct.unpack_from("!I", packet, 44)
        return TooBig(packet[:40], packet[8:24], packet[24:40], 2, 0, mtu, packet[48:])
    return None


def serialize_too_big(msg: TooBig) -> bytes:
    """Rebuild the message with its (possibly rewritten) MTU and quote, and a fresh checksum."""
    if msg.icmp_type == 3:
        body = bytearray(struct.pack("!BBHHH", 3, 4, 0, 0, msg.mtu) + msg.quote)
        struct.pack_into("!H", body, 2, finish_checksum(checksum_fold(body)))
    else:
        body = bytearray(struct.pack("!BBHI", 2, 0, 0, msg.mtu) + msg.quote)
        total = pseudo_header_sum(msg.src, msg.dst, len(body), IPPROTO_ICMPV6) + checksum_fold(body)
        struct.pack_into("!H", body, 2, finish_checksum(total))
    return serialize_ip_header(msg.ip_header, len(body)) + bytes(body)
