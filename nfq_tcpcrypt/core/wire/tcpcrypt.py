"""The wire format of tcpcrypt: Init1 and Init2 (RFC 8548 §4.1) and frames (RFC 8548 §4.2)."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from ..constants import (
    CONTROL_REKEY,
    FLAG_FINP,
    FLAG_URGP,
    FRAME_HEADER_LEN,
    INIT1_MAGIC,
    INIT2_MAGIC,
    N_A_LEN,
    N_B_LEN,
    Tep,
)
from ..errors import MalformedSegment
from ..kex import public_key_length

_HEAD: Final = struct.Struct("!II")

FRAME_HEADER: Final = struct.Struct("!BH")
"""A frame's header, `control | clen` (RFC 8548 §4.2); it is also the AEAD's associated data."""


def pack_frame_header(clen: int, rekey: bool) -> bytes:
    """The header of a frame whose ciphertext (tag included) is `clen` bytes."""
    return FRAME_HEADER.pack(CONTROL_REKEY if rekey else 0, clen)


def unpack_frame_header(buf: bytes | bytearray | memoryview, at: int = 0) -> tuple[int, int]:
    """(control, clen) of the frame at `at`; the caller checks that FRAME_HEADER_LEN bytes exist."""
    control, clen = FRAME_HEADER.unpack_from(buf, at)
    return control, clen


def frame_size(buf: bytes | bytearray, at: int = 0) -> int | None:
    """Header plus ciphertext of the frame at `at`, or None while its header is incomplete."""
    if len(buf) - at < FRAME_HEADER_LEN:
        return None
    return FRAME_HEADER_LEN + ((buf[at + 1] << 8) | buf[at + 2])


def is_rekey(control: int) -> bool:
    """The control byte's rekey bit: the frame is the first of the sender's next key set (§3.8)."""
    return bool(control & CONTROL_REKEY)


def control_known(control: int) -> bool:
    """No control bit set that RFC 8548 §4.2 does not define (they MUST be zero)."""
    return not control & ~CONTROL_REKEY


def frame_plaintext(data: bytes, finp: bool) -> bytes:
    """The plaintext sealed in a frame: the flags byte (FINp on the stream's last frame), then data."""
    return bytes((FLAG_FINP if finp else 0,)) + data


def frame_data(plaintext: bytes) -> tuple[bytes, bool]:
    """(application data, FINp) of an opened frame's plaintext (flags byte first, §4.2); the
    2-byte urgent pointer of a URGp frame is skipped (RFC 8548 §3.7: urgent data is never used)."""
    flags = plaintext[0]
    return (plaintext[3:] if flags & FLAG_URGP else plaintext[1:]), bool(flags & FLAG_FINP)


def frame_urgent(plaintext: bytes) -> bool:
    """Whether an opened frame's flags byte has URGp."""
    return bool(plaintext[0] & FLAG_URGP)


@dataclass(frozen=True, slots=True, init=False)
class Init1:
    """RFC 8548 §4.1: magic, message_len, nciphers, sym_cipher list, N_A, Pub_A, ignored.

    The constructor is written out (as for core/events.py): compiled, a dataclass's generated one
    stays interpreted."""

    sym_ciphers: tuple[int, ...]
    n_a: bytes
    pk_a: bytes
    ignored: bytes

    def __init__(self, sym_ciphers: tuple[int, ...], n_a: bytes, pk_a: bytes, ignored: bytes = b"") -> None:
        object.__setattr__(self, "sym_ciphers", sym_ciphers)
        object.__setattr__(self, "n_a", n_a)
        object.__setattr__(self, "pk_a", pk_a)
        object.__setattr__(self, "ignored", ignored)


@dataclass(frozen=True, slots=True, init=False)
class Init2:
    """RFC 8548 §4.1: magic, message_len, sym_cipher, N_B, Pub_B, ignored (constructor as Init1's)."""

    sym_cipher: int
    n_b: bytes
    pk_b: bytes
    ignored: bytes

    def __init__(self, sym_cipher: int, n_b: bytes, pk_b: bytes, ignored: bytes = b"") -> None:
        object.__setattr__(self, "sym_cipher", sym_cipher)
        object.__setattr__(self, "n_b", n_b)
        object.__setattr__(self, "pk_b", pk_b)
        object.__setattr__(self, "ignored", ignored)


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
