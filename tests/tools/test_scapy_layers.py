"""The scapy layers for TCP-ENO and the Init messages agree with the daemon's own codecs."""

from __future__ import annotations

import os

from scapy.layers.inet import IP, TCP
from scapy.packet import Raw

from nfq_tcpcrypt.core.constants import INIT1_MAGIC, Tep
from nfq_tcpcrypt.core.wire.eno import EnoOption, TepSuboption, parse_eno
from nfq_tcpcrypt.core.wire.tcp import parse_options, parse_segment
from nfq_tcpcrypt.core.wire.tcpcrypt import Init1, Init2, parse_init1, parse_init2, serialize_init1, serialize_init2
from nfq_tcpcrypt.tools.scapy_layers import TcpcryptInit1, TcpcryptInit2, dissect_init, eno_option, find_eno


def test_eno_option_crafted_with_scapy_is_read_by_the_daemon():
    subs = [0x21, TepSuboption(0x22, b"\x01" * 18, True), TepSuboption(0x20, b"xy", True)]
    syn = IP(src="192.0.2.1", dst="192.0.2.2") / TCP(sport=1, dport=2, flags="S", options=[eno_option(subs, 0x01)])
    seg = parse_segment(bytes(syn), verify_checksum=True)
    (raw,) = [option for kind, option in parse_options(seg.options) if kind == 69]
    parsed = parse_eno(raw)
    assert parsed == EnoOption(0x01, (TepSuboption(0x21), TepSuboption(0x22, b"\x01" * 18, True),
                                      TepSuboption(0x20, b"xy", True)))
    again = IP(bytes(syn))
    assert find_eno(again[TCP]) == parsed
    assert find_eno((IP() / TCP(options=[eno_option(non_syn=True)]))[TCP]) == EnoOption()
    assert find_eno((IP() / TCP(options=[("MSS", 1460)]))[TCP]) is None
    # RFC 8547 §4.4: a length byte that runs past the option makes it ill-formed (treated as absent).
    assert find_eno(IP(bytes(IP() / TCP(options=[(69, b"\x9f\xa1")])))[TCP]) is None


def test_init_messages_both_ways():
    init1 = serialize_init1(Init1((0x0001, 0x0002), os.urandom(32), os.urandom(32)))
    layer = dissect_init(init1 + b"frames")
    assert isinstance(layer, TcpcryptInit1) and layer.magic == INIT1_MAGIC
    assert layer.sym_ciphers == [1, 2] and layer.message_len == len(init1)
    assert bytes(layer[Raw]) == b"frames"
    crafted = bytes(TcpcryptInit1(sym_ciphers=[0x0001], n_a=b"\x07" * 32, pk_a=b"\x09" * 32))
    assert parse_init1(crafted, Tep.X25519) == Init1((1,), b"\x07" * 32, b"\x09" * 32)
    init2 = serialize_init2(Init2(0x0001, os.urandom(32), os.urandom(32)))
    layer2 = dissect_init(init2)
    assert isinstance(layer2, TcpcryptInit2) and layer2.sym_cipher == 1 and bytes(layer2) == init2
    crafted2 = bytes(TcpcryptInit2(sym_cipher=2, n_b=b"\x05" * 32, pk_b=b"\x06" * 32))
    assert parse_init2(crafted2, Tep.X25519) == Init2(2, b"\x05" * 32, b"\x06" * 32)
    assert dissect_init(b"GET / HTTP/1.1\r\n") is None
