"""Init1 and Init2, the key-exchange messages of tcpcrypt (RFC 8548 §4.1)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..constants import INIT1_MAGIC, INIT2_MAGIC, N_A_LEN, N_B_LEN, Tep
from ..errors import MalformedSegment
from ..kex import public_key_length

_HEAD = struct.Struct("!II")


@dataclass(frozen=True, slots=True)
class Init1:
    """RFC 8548 §4.1: magic, message_len, nciphers, sym_cipher list, N_A, Pub_A, ignored."""

    sym_ciphers: tuple[int, ...]
    n_a: bytes
    pk_a: bytes
    ignored: bytes = b""


@dataclass(frozen=True, slots=True)
class Init2:
    """RFC 8548 §4.1: magic, message_len, sym_cipher, N_B, Pub_B, ignored."""

    sym_cipher: int
    n_b: bytes
    pk_b: bytes
    ignored: bytes = b""


def init_message_length(data: bytes | bytearray, magic: int) -> int | None:
    """message_len of an Init message at the start of `data`, or None while fewer than 8 bytes.

    Raises MalformedSegment when the magic is wrong (docs/protocol.md T5: the caller aborts).
    """
    if len(data) < 8:
        return None
    got, length = _HEAD.unpack_from(data)
    if got != magic:
        raise MalformedSegment(f"magic {got:#010x}, expected {magic:#010x}")
    return int(length)


def serialize_init1(msg: Init1) -> bytes:
    """Encode Init1 (message_len covers the whole message)."""
    body = bytes((len(msg.sym_ciphers),)) + b"".join(struct.pack("!H", c) for c in msg.sym_ciphers)
    body += msg.n_a + msg.pk_a + msg.ignored
    return _HEAD.pack(INIT1_MAGIC, 8 + len(body)) + body


def parse_init1(data: bytes, tep: Tep) -> Init1:
    """Decode a whole Init1; `tep` fixes the public key encoding (RFC 8548 §5)."""
    length = _checked_length(data, INIT1_MAGIC)
    if length < 9:
        raise MalformedSegment(f"init1 message_len {length} too short")
    nciphers = data[8]
    if nciphers == 0:
        raise MalformedSegment("init1 lists no cipher")
    at = 9 + 2 * nciphers
    if at + N_A_LEN > length:
        raise MalformedSegment(f"init1 message_len {length} too short for {nciphers} ciphers")
    ciphers = struct.unpack_from(f"!{nciphers}H", data, 9)
    n_a = bytes(data[at : at + N_A_LEN])
    at += N_A_LEN
    pk_len = public_key_length(tep, data[at:length])
    if at + pk_len > length:
        raise MalformedSegment(f"init1 message_len {length} too short for the {tep.name} key")
    return Init1(ciphers, n_a, bytes(data[at : at + pk_len]), bytes(data[at + pk_len : length]))


def serialize_init2(msg: Init2) -> bytes:
    """Encode Init2 (message_len covers the whole message)."""
    body = struct.pack("!H", msg.sym_cipher) + msg.n_b + msg.pk_b + msg.ignored
    return _HEAD.pack(INIT2_MAGIC, 8 + len(body)) + body


def parse_init2(data: bytes, tep: Tep) -> Init2:
    """Decode a whole Init2; `tep` fixes the public key encoding (RFC 8548 §5)."""
    length = _checked_length(data, INIT2_MAGIC)
    at = 10 + N_B_LEN
    if length < at:
        raise MalformedSegment(f"init2 message_len {length} too short")
    (cipher,) = struct.unpack_from("!H", data, 8)
    n_b = bytes(data[10:at])
    pk_len = public_key_length(tep, data[at:length])
    if at + pk_len > length:
        raise MalformedSegment(f"init2 message_len {length} too short for the {tep.name} key")
    return Init2(cipher, n_b, bytes(data[at : at + pk_len]), bytes(data[at + pk_len : length]))


def _checked_length(data: bytes, magic: int) -> int:
    length = init_message_length(data, magic)
    if length is None or length != len(data):
        raise MalformedSegment(f"init message of {len(data)} bytes, message_len {length}")
    return length
