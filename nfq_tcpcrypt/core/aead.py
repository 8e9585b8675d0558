"""Frame protection: one FrameCipher per direction and key generation (RFC 8548 §3.6, §4.2, §6).

The sole importer of the AEAD primitives.
"""

from __future__ import annotations

from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from .constants import FRAME_HEADER_LEN, MAX_CLEN, TAG_LEN, Aead
from .errors import IntegrityError, LocalProtocolError
from .wire.tcpcrypt import pack_frame_header

# RFC 8548 §6: (ae_key_len, ae_nonce_len) of each AEAD.
AEAD_KEY_LEN: Final = {Aead.AES_128_GCM: 16, Aead.AES_256_GCM: 32, Aead.CHACHA20_POLY1305: 32}
AEAD_NONCE_LEN: Final = 12
# Bound once: compiled, a call through a module constant skips the method lookup per call.
_TO_BYTES: Final = int.to_bytes
_SLICED: Final = 2048  # frames up to this size are opened from a copy of their ciphertext
_CLASSES: Final[dict[Aead, type[AESGCM] | type[ChaCha20Poly1305]]] = {
    Aead.AES_128_GCM: AESGCM,
    Aead.AES_256_GCM: AESGCM,
    Aead.CHACHA20_POLY1305: ChaCha20Poly1305,
}


def traffic_key_len(aead: Aead) -> int:
    """ae_key_len + ae_nonce_len: the length of k_ab / k_ba (RFC 8548 §3.3)."""
    return AEAD_KEY_LEN[aead] + AEAD_NONCE_LEN


class FrameCipher:
    """Seals and opens frames for one direction under one traffic key (RFC 8548 §3.6).

    The traffic key is K | NR; the nonce of a frame is its frame ID (4 zero bytes and the 8-byte
    offset of the frame's first byte in the framing stream) XOR NR (§4.2.3).
    """

    __slots__ = ("_aead", "_nr")

    _aead: AESGCM | ChaCha20Poly1305

    def __init__(self, aead: Aead, traffic_key: bytes | bytearray) -> None:
        key_len = AEAD_KEY_LEN[aead]
        if len(traffic_key) != key_len + AEAD_NONCE_LEN:
            raise LocalProtocolError(f"traffic key of {len(traffic_key)} bytes for {aead.name}")
        self._aead = _CLASSES[aead](traffic_key[:key_len])
        self._nr = int.from_bytes(traffic_key[key_len:], "big")

    def _nonce(self, offset: int) -> bytes:
        return _TO_BYTES(self._nr ^ offset, AEAD_NONCE_LEN, "big")

    def seal(self, offset: int, plaintext: bytes, rekey: bool = False) -> bytes:
        """Return the frame for `plaintext` (flags byte first) starting at framing-stream `offset`."""
        clen = len(plaintext) + TAG_LEN
        if clen > MAX_CLEN:
            raise LocalProtocolError(f"frame plaintext of {len(plaintext)} bytes is too long")
        header = pack_frame_header(clen, rekey)
        return header + self._aead.encrypt(self._nonce(offset), plaintext, header)

    def open(self, offset: int, frame: bytes | memoryview) -> bytes:
        """Verify and decrypt a whole frame at `offset`; return its plaintext (flags byte first)."""
        header: bytes
        body: bytes | memoryview
        if isinstance(frame, bytes) and len(frame) <= _SLICED:
            # A small frame's header and ciphertext as slices: a view and its slice, or a call of
            # bytes(), cost more than copying a few hundred bytes.
            header, body = frame[:FRAME_HEADER_LEN], frame[FRAME_HEADER_LEN:]
        else:  # a big frame's ciphertext as a view, not copied before it is decrypted
            header, body = bytes(frame[:FRAME_HEADER_LEN]), memoryview(frame)[FRAME_HEADER_LEN:]
        try:
            return self._aead.decrypt(self._nonce(offset), body, header)
        except InvalidTag:
            raise IntegrityError(f"frame at offset {offset} failed authentication") from None
