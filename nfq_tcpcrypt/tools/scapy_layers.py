"""Scapy layers for crafting and dissecting TCP-ENO options and tcpcrypt Init messages.

For tools, tests and test middleboxes only: the daemon's per-packet path never imports scapy.

    from scapy.all import IP, TCP
    from nfq_tcpcrypt.tools.scapy_layers import TcpcryptInit1, eno_option, find_eno

    syn = IP(dst="192.0.2.1") / TCP(dport=80, flags="S", options=[eno_option(teps=[0x21])])
    offer = find_eno(syn[TCP])            # EnoOption(global_byte=None, teps=(TepSuboption(0x21),))
    init1 = TcpcryptInit1(payload_bytes)  # magic, message_len, sym_ciphers, n_a, pk_a

The ENO option follows RFC 8547 §4.1 (global suboption, TEP suboptions, length bytes, §4.4); Init1
and Init2 follow RFC 8548 §4.1. Encoding and decoding of the option reuse the daemon's own codec
(`core/wire/eno.py`), so what is crafted here is what the daemon reads.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from scapy.fields import (
    FieldLenField,
    FieldListField,
    ShortField,
    StrFixedLenField,
    StrLenField,
    XIntField,
)
from scapy.packet import Packet

from ..core.constants import ENO_OPTION_KIND, INIT1_MAGIC, INIT2_MAGIC, N_A_LEN, N_B_LEN
from ..core.errors import MalformedSegment
from ..core.wire.eno import EnoOption, TepSuboption, parse_eno, serialize_eno

__all__ = [
    "EnoOption",
    "TcpcryptInit1",
    "TcpcryptInit2",
    "TepSuboption",
    "dissect_init",
    "eno_option",
    "find_eno",
]


def eno_option(
    teps: Iterable[int | TepSuboption] = (), global_byte: int | None = None, non_syn: bool = False
) -> tuple[int, bytes]:
    """A TCP-ENO option for scapy's `TCP(options=[...])`: (69, contents without kind and length).

    `teps` are TEP ids (0x20..0x7f) or TepSuboption (with data, v = 1); `non_syn` gives the
    empty non-SYN form (RFC 8547 §4.1).
    """
    if non_syn:
        return (ENO_OPTION_KIND, b"")
    subs = tuple(t if isinstance(t, TepSuboption) else TepSuboption(int(t)) for t in teps)
    return (ENO_OPTION_KIND, serialize_eno(EnoOption(global_byte, subs))[2:])


def find_eno(tcp: Any) -> EnoOption | None:
    """The decoded SYN-form ENO option of a scapy TCP layer, or None (absent, or ill-formed per
    RFC 8547 §4.4, which a receiver treats as absent)."""
    for option in tcp.options:
        kind, value = option if isinstance(option, tuple) else (option, b"")
        if kind == ENO_OPTION_KIND:
            contents = value if isinstance(value, bytes) else bytes(value or b"")
            try:
                return parse_eno(bytes((ENO_OPTION_KIND, len(contents) + 2)) + contents)
            except MalformedSegment:
                return None
    return None


class TcpcryptInit1(Packet):
    """RFC 8548 §4.1 Init1: magic, message_len, nciphers, sym_cipher list, N_A, then PK_A (and any
    ignored trailing bytes: their split depends on the negotiated TEP) up to message_len."""

    name = "tcpcrypt Init1"
    fields_desc = [
        XIntField("magic", INIT1_MAGIC),
        FieldLenField(
            "message_len", None, fmt="!I", length_of="pk_a",
            adjust=lambda pkt, x: x + 9 + 2 * len(pkt.sym_ciphers) + N_A_LEN,
        ),
        FieldLenField("nciphers", None, fmt="B", count_of="sym_ciphers"),
        FieldListField("sym_ciphers", [0x0001], ShortField("", 0), count_from=lambda pkt: pkt.nciphers),
        StrFixedLenField("n_a", b"\0" * N_A_LEN, N_A_LEN),
        StrLenField(
            "pk_a", b"", length_from=lambda pkt: max(pkt.message_len - 9 - 2 * pkt.nciphers - N_A_LEN, 0)
        ),
    ]


class TcpcryptInit2(Packet):
    """RFC 8548 §4.1 Init2: magic, message_len, sym_cipher, N_B, then PK_B (and any ignored
    trailing bytes) up to message_len."""

    name = "tcpcrypt Init2"
    fields_desc = [
        XIntField("magic", INIT2_MAGIC),
        FieldLenField("message_len", None, fmt="!I", length_of="pk_b", adjust=lambda pkt, x: x + 10 + N_B_LEN),
        ShortField("sym_cipher", 0x0001),
        StrFixedLenField("n_b", b"\0" * N_B_LEN, N_B_LEN),
        StrLenField("pk_b", b"", length_from=lambda pkt: max(pkt.message_len - 10 - N_B_LEN, 0)),
    ]


def dissect_init(stream: bytes) -> Packet | None:
    """Init1 or Init2 at the start of a tcpcrypt byte stream (by its magic), or None; the frames
    after message_len are the layer's payload (scapy Raw)."""
    if len(stream) < 8:
        return None
    magic = int.from_bytes(stream[:4], "big")
    if magic == INIT1_MAGIC:
        return TcpcryptInit1(stream)
    if magic == INIT2_MAGIC:
        return TcpcryptInit2(stream)
    return None

