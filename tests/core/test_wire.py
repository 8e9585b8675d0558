"""Strict codecs: ENO (RFC 8547 §4.1–§4.4), Init1/Init2 (RFC 8548 §4.1), TCP/IP segments."""

from __future__ import annotations

import struct

import pytest

from nfq_tcpcrypt.core.constants import Aead, Tep
from nfq_tcpcrypt.core.errors import MalformedSegment
from nfq_tcpcrypt.core.wire.eno import EnoOption, TepSuboption, parse_eno, serialize_eno
from nfq_tcpcrypt.core.wire.ip import tcp_ports_of
from nfq_tcpcrypt.core.wire.tcp import (
    new_segment,
    parse_options,
    parse_segment,
    sack_pairs,
    serialize_options,
    serialize_segment,
    timestamp_option,
    with_sack,
)
from nfq_tcpcrypt.core.wire.tcpcrypt import (
    Init1,
    Init2,
    parse_init1,
    parse_init2,
    serialize_init1,
    serialize_init2,
)
from tests import vectors as v


class TestEno:
    def test_rfc8547_example_options(self):
        a = parse_eno(v.ENO_A_SYN)
        assert a.global_byte is None and not a.b
        assert [s.tep for s in a.teps] == [0x24, 0x23]
        b = parse_eno(v.ENO_B_SYNACK)
        assert b.b and not b.a and [s.tep for s in b.teps] == [0x23]
        assert a.raw + b.raw == v.ENO_EXAMPLE_TRANSCRIPT
        assert serialize_eno(EnoOption(0x01, (TepSuboption(0x23),))) == v.ENO_B_SYNACK

    def test_data_suboption_last_and_with_length_byte(self):
        ident, nonce = bytes(range(9)), bytes(range(100, 108))
        last = serialize_eno(EnoOption(None, (TepSuboption(0x23, ident + nonce, True),)))
        assert last == bytes((0x45, 0x14, 0xA3)) + ident + nonce  # RFC 8547 §4.1, §4.4 with concrete bytes
        middle = serialize_eno(EnoOption(None, (TepSuboption(0x23, ident + nonce, True), TepSuboption(0x24))))
        assert middle == bytes((0x45, 0x16, 0x90, 0xA3)) + ident + nonce + b"\x24"
        for raw in (last, middle):
            assert serialize_eno(parse_eno(raw)) == raw

    def test_only_first_global_suboption_counts(self):
        assert parse_eno(bytes((0x45, 0x05, 0x01, 0x00, 0x23))).b

    @pytest.mark.parametrize(
        "raw",
        [
            bytes((0x45, 0x04, 0x85, 0xA3)),  # length byte runs past the option (§4.4 rule 1)
            bytes((0x45, 0x05, 0x80, 0x23, 0x00)),  # length byte followed by v=0 (§4.4 rule 2)
            bytes((0x45, 0x05, 0x80, 0x90, 0x00)),  # ... or by another length byte
            bytes((0x45, 0x03)),  # length byte disagrees with the option
        ],
    )
    def test_ill_formed(self, raw):
        with pytest.raises(MalformedSegment):
            parse_eno(raw)

    def test_unknown_teps_and_reserved_bits_are_well_formed(self):
        option = parse_eno(bytes((0x45, 0x05, 0x1C, 0x55, 0x23)))
        assert [s.tep for s in option.teps] == [0x55, 0x23] and not option.b


class TestInit:
    def test_round_trip_and_ignored_trailer(self):
        msg = Init1((Aead.AES_128_GCM, Aead.CHACHA20_POLY1305), bytes(32), bytes(range(32)), b"xyz")
        raw = serialize_init1(msg)
        assert raw[:4] == bytes.fromhex("15101a0e") and int.from_bytes(raw[4:8], "big") == len(raw)
        assert parse_init1(raw, Tep.X25519) == msg
        msg2 = Init2(Aead.AES_128_GCM, bytes(32), bytes(range(32)))
        raw2 = serialize_init2(msg2)
        assert raw2[:4] == bytes.fromhex("097105e0") and len(raw2) == 74
        assert parse_init2(raw2, Tep.X25519) == msg2

    @pytest.mark.parametrize("cut", [9, 40, 72])
    def test_lying_lengths(self, cut):
        raw = bytearray(serialize_init1(Init1((1,), bytes(32), bytes(32))))
        raw[4:8] = cut.to_bytes(4, "big")
        with pytest.raises(MalformedSegment):
            parse_init1(bytes(raw[:cut]), Tep.X25519)

    def test_no_cipher_and_bad_magic(self):
        raw = bytearray(serialize_init1(Init1((1,), bytes(32), bytes(32))))
        with pytest.raises(MalformedSegment):
            parse_init2(bytes(raw), Tep.X25519)
        raw[8] = 0
        with pytest.raises(MalformedSegment):
            parse_init1(bytes(raw), Tep.X25519)


class TestSegment:
    def _packet(self, src=bytes([10, 0, 0, 1]), dst=bytes([10, 0, 0, 2])):
        seg = new_segment(src, dst, 1234, 80, 0xFFFFFFF0, 7, 0x18, 512, b"\x01\x01\x08\x0a" + bytes(8), b"data")
        return serialize_segment(seg)

    @pytest.mark.parametrize("family", [4, 6])
    def test_round_trip_and_checksum(self, family):
        v4 = (bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))
        src, dst = v4 if family == 4 else (bytes(15) + b"\x01", bytes(15) + b"\x02")
        raw = self._packet(src, dst)
        seg = parse_segment(raw, verify_checksum=True)
        assert (seg.sport, seg.dport, seg.seq, seg.ack, seg.payload) == (1234, 80, 0xFFFFFFF0, 7, b"data")
        assert serialize_segment(seg) == raw
        broken = bytearray(raw)
        broken[-1] ^= 0xFF
        with pytest.raises(MalformedSegment):
            parse_segment(bytes(broken), verify_checksum=True)

    def test_truncated_and_lying(self):
        raw = self._packet()
        for bad in (raw[:30], raw[:19], raw + b"x"):
            with pytest.raises(MalformedSegment):
                parse_segment(bad)

    @pytest.mark.parametrize("options", [b"\x02", b"\x02\x01\x00\x00", b"\x02\x08\x05\xb4", b"\x08\x0a" + bytes(4)])
    def test_strict_options(self, options):
        with pytest.raises(MalformedSegment):
            parse_options(options)

    def test_options_round_trip(self):
        raw = b"\x02\x04\x05\xb4\x04\x02\x08\x0a" + bytes(8) + b"\x01\x03\x03\x07"
        assert serialize_options(parse_options(raw)) == raw


def test_with_sack_keeps_the_first_blocks_that_fit_the_limit():
    ts = [(8, timestamp_option(1, 2)[2:])]  # 10 bytes
    blocks = [(100, 200), (300, 400), (500, 600), (700, 800)]
    full = with_sack(ts, blocks)  # 10 + 2 + 3 * 8 = 36, padded to 36: three blocks fit in 40
    assert len(full) == 36 and sack_pairs(full[full.index(5) :]) == blocks[:3]
    one = with_sack(ts, blocks, limit=24)  # 10 + 2 + 8 = 20 -> 20
    assert len(one) == 20 and sack_pairs(one[one.index(5) :]) == blocks[:1]
    assert with_sack(ts, blocks, limit=12) == with_sack(ts, [])  # no room: no SACK option at all


def _v6(next_header: int, extensions: bytes, ports: bytes = b"\x9c\x40\x00\x50") -> bytes:
    body = extensions + ports + bytes(16)
    return bytes([0x60, 0, 0, 0]) + struct.pack("!HBB", len(body), next_header, 64) + bytes(range(32)) + body


def test_tcp_ports_of_packets_the_codec_refuses():
    """The 4-tuple of a TCP packet `parse_ip` refuses, where a host's stack would still find TCP:
    past IPv6 extension headers (RFC 8200 §4), in a first fragment; none past the first."""
    ports = (bytes(range(16)), 40000, bytes(range(16, 32)), 80)
    hop = bytes([60, 0]) + bytes(6)  # hop-by-hop, next: destination options, 8 bytes
    dest = bytes([6, 1]) + bytes(14)  # destination options, next: TCP, 16 bytes
    assert tcp_ports_of(_v6(0, hop + dest)) == ports
    assert tcp_ports_of(_v6(60, (bytes([60, 0]) + bytes(6)) * 41 + dest)) == ports  # a stack skips them all
    first = bytes([6, 0, 0, 1]) + bytes(4)  # fragment header, offset 0, more fragments
    assert tcp_ports_of(_v6(44, first)) == ports
    assert tcp_ports_of(_v6(44, bytes([6, 0, 0, 0x08]) + bytes(4))) is None  # offset 1: no TCP header
    ah = bytes([6, 1]) + bytes(10)  # authentication header, (1 + 2) * 4 = 12 bytes
    assert tcp_ports_of(_v6(51, ah)) == ports
    assert tcp_ports_of(_v6(17, b"")) is None  # UDP
    assert tcp_ports_of(_v6(60, bytes([6, 200]) + bytes(6))) is None  # claims more than there is
    v4 = bytes([0x46, 0, 0, 44, 0, 0, 0x20, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2]) + bytes(4)
    assert tcp_ports_of(v4 + b"\x9c\x40\x00\x50" + bytes(16)) == (bytes([10, 0, 0, 1]), 40000, bytes([10, 0, 0, 2]), 80)
    assert tcp_ports_of(v4[:6] + b"\x00\x10" + v4[8:] + b"\x9c\x40\x00\x50") is None  # not the first fragment
