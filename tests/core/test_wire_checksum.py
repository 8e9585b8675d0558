"""The ones'-complement checksum (RFC 1071) and TCP/IP segment round trips against plain references."""

from __future__ import annotations

import random
import struct

import pytest

from nfq_tcpcrypt.core.errors import MalformedSegment
from nfq_tcpcrypt.core.wire.ip import checksum_fold, finish_checksum, ones_sum, parse_ip, pseudo_header_sum
from nfq_tcpcrypt.core.wire.tcp import Segment, new_segment, parse_segment, serialize_segment


def reference_sum(data: bytes) -> int:
    """RFC 1071 §4.1 as written: add 16-bit words, an odd last byte padded with zero, fold carries."""
    total = 0
    for i in range(0, len(data) - 1, 2):
        total += (data[i] << 8) | data[i + 1]
    if len(data) & 1:
        total += data[-1] << 8
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def reference_fold(data: bytes) -> int:
    """The folded sum in 1..0xFFFF, as checksum_fold returns it (zero only for all-zero words)."""
    return reference_sum(data) or 0xFFFF


def tcp_checksum_ok(packet: bytes) -> bool:
    """The TCP checksum of `packet` verified word by word over pseudo-header and segment."""
    version, ihl, src, dst = parse_ip(packet)
    segment = packet[ihl:]
    if version == 4:
        pseudo = src + dst + struct.pack("!BBH", 0, 6, len(segment))
    else:
        pseudo = src + dst + struct.pack("!IxxxB", len(segment), 6)
    return reference_sum(pseudo + segment) == 0xFFFF


def ip_checksum_ok(packet: bytes) -> bool:
    """An IPv4 header's checksum verified word by word (IPv6 has none)."""
    if packet[0] >> 4 != 4:
        return True
    return reference_sum(packet[: (packet[0] & 0x0F) * 4]) == 0xFFFF


RNG = random.Random(1071)


def random_bytes(n: int, rng: random.Random = RNG) -> bytes:
    return rng.randbytes(n)


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_fold_equals_reference_every_length_to_300(kind: type) -> None:
    rng = random.Random(300)
    for n in range(301):
        for data in (random_bytes(n, rng), b"\xff" * n, bytes(n)):
            expected = reference_fold(data)
            assert checksum_fold(kind(data)) == expected, (n, data.hex())
            assert ones_sum(data) == expected % 0xFFFF


def test_sum_from_an_offset() -> None:
    """`ones_sum(data, start)` is the sum of `data[start:]`, across the sizes of its pieces."""
    rng = random.Random(1624)
    for n in (0, 1, 2, 39, 40, 41, 512, 513, 600, 1460, 1461, 4096, 4097, 5000, 16384, 16385, 20001, 65535):
        data = random_bytes(n, rng)
        for start in {0, 1, 2, 8, 12, 20, 40, n // 2, max(n - 1, 0), n}:
            if start <= n:
                assert ones_sum(data, start) == reference_fold(data[start:]) % 0xFFFF, (n, start)


@pytest.mark.parametrize(
    "n", [511, 512, 513, 514, 767, 4095, 4096, 4097, 4098, 8191, 8193, 9001, 16384, 16385, 16386, 32767, 65534, 65535]
)
def test_fold_equals_reference_large_buffers(n: int) -> None:
    """Across the chunk boundaries of the summing, odd and even, up to an IP packet's most."""
    rng = random.Random(n)
    for data in (random_bytes(n, rng), b"\xff" * n, bytes(n - 1) + b"\x01"):
        expected = reference_fold(data)
        assert checksum_fold(data) == expected
        assert checksum_fold(memoryview(data)) == expected
        assert checksum_fold(bytearray(data)) == expected


def test_fold_random_lengths_up_to_65535() -> None:
    rng = random.Random(65535)
    for _ in range(20):
        data = random_bytes(rng.randrange(301, 65536), rng)
        assert checksum_fold(data) == reference_fold(data)


def test_finish_and_pseudo_header_match_reference() -> None:
    rng = random.Random(9293)
    for length in (0, 1, 20, 1480, 65515):
        src, dst = random_bytes(4, rng), random_bytes(4, rng)
        words = src + dst + struct.pack("!BBH", 0, 6, length)
        assert pseudo_header_sum(src, dst, length) % 0xFFFF == reference_sum(words) % 0xFFFF
        assert finish_checksum(pseudo_header_sum(src, dst, length)) == ~reference_fold(words) & 0xFFFF


def v4_header_with_options(src: bytes, dst: bytes, size: int = 24) -> bytes:
    """An IPv4 header of `size` bytes: NOPs and an EOL as its options (RFC 791)."""
    options = b"\x01" * (size - 21) + b"\x00"
    return struct.pack("!BBHHHBBH4s4s", 0x40 | size // 4, 0, size, 0, 0x4000, 64, 6, 0, src, dst) + options


def random_segment(rng: random.Random, family: str) -> Segment:
    size = 16 if family == "v6" else 4
    src, dst = random_bytes(size, rng), random_bytes(size, rng)
    options = random_bytes(rng.choice((0, 4, 8, 12, 20, 40)), rng)
    payload_len = rng.choice((0, 0, 1, rng.randrange(2, 200), rng.randrange(200, 1500), rng.randrange(1500, 65000)))
    seg = new_segment(
        src, dst, rng.randrange(65536), rng.randrange(65536), rng.randrange(1 << 32), rng.randrange(1 << 32),
        rng.randrange(256), rng.randrange(65536), options, random_bytes(payload_len, rng),
    )
    seg.urgent = rng.randrange(65536)
    if family == "v4opts":
        seg.ip_header = v4_header_with_options(src, dst, rng.choice((24, 40, 60)))
    return seg


FIELDS = ("src", "dst", "sport", "dport", "seq", "ack", "flags", "window", "urgent", "options", "payload")


@pytest.mark.parametrize("family", ["v4", "v4opts", "v6"])
def test_serialize_parse_round_trip(family: str) -> None:
    rng = random.Random(family)
    for _ in range(150):
        seg = random_segment(rng, family)
        packet = serialize_segment(seg)
        assert tcp_checksum_ok(packet) and ip_checksum_ok(packet)
        back = parse_segment(packet, verify_checksum=True)
        for field in FIELDS:
            assert getattr(back, field) == getattr(seg, field), field
        assert serialize_segment(back) == packet  # the parsed header kept, the same bytes
        # A rewritten field: the same bytes as a segment built with it from scratch.
        back.seq = (back.seq + rng.randrange(1, 1 << 32)) & 0xFFFFFFFF
        back.options = back.options[:4]
        again = serialize_segment(back)
        assert tcp_checksum_ok(again) and ip_checksum_ok(again)
        fresh = new_segment(back.src, back.dst, back.sport, back.dport, back.seq, back.ack, back.flags,
                            back.window, back.options, back.payload)
        fresh.urgent, fresh.ip_header = back.urgent, back.ip_header
        assert serialize_segment(fresh) == again
        # Any flipped bit fails verification or parsing.
        bit = rng.randrange(len(packet) * 8)
        broken = bytearray(packet)
        broken[bit // 8] ^= 1 << (bit % 8)
        try:
            damaged = parse_segment(bytes(broken), verify_checksum=True)
        except MalformedSegment:
            continue
        # Only a flip in IP header words outside the pseudo-header parses (TTL, TOS, flow label:
        # the TCP checksum does not cover them); the segment is then the original one.
        ihl = len(back.ip_header)
        at = 12 if packet[0] >> 4 == 4 else 8
        assert bit // 8 < ihl and not at <= bit // 8 < at + 2 * len(seg.src)
        for field in FIELDS:
            assert getattr(damaged, field) == getattr(seg, field), field


def test_kernel_checksum_leaves_the_field_zero() -> None:
    seg = random_segment(random.Random(5), "v4")
    seg.kernel_checksum = True
    packet = serialize_segment(seg)
    assert packet[36:38] == b"\x00\x00" and ip_checksum_ok(packet)


@pytest.mark.parametrize("size", [24, 40, 60])
def test_verify_of_ipv4_with_options(size: int) -> None:
    """The pseudo-header of an IPv4 header with options is its addresses, not the words before the
    TCP header (a 40-byte IPv4 header is not an IPv6 one)."""
    seg = random_segment(random.Random(7), "v4")
    seg.ip_header = v4_header_with_options(seg.src, seg.dst, size)
    packet = serialize_segment(seg)
    assert tcp_checksum_ok(packet)
    assert parse_segment(packet, verify_checksum=True).payload == seg.payload
