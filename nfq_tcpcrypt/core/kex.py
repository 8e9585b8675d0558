"""Key agreement and key schedule of tcpcrypt (RFC 8548 §3.3–§3.5, §5); the sole asymmetric-crypto importer."""

from __future__ import annotations

import struct
from collections import deque
from hashlib import sha256
from typing import Any, Final, Protocol

from cryptography.hazmat.primitives.asymmetric import ec, x448, x25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from .constants import (
    CONST_KEY_A,
    CONST_KEY_B,
    CONST_NEXTK,
    CONST_REKEY,
    CONST_RESUME,
    CONST_SESSID,
    K_LEN,
    Tep,
)
from .errors import MalformedSegment, RemoteProtocolError

PrivateKey = Any  # one of the cryptography private-key classes of _SCHEMES


class KeyFactory(Protocol):
    """Makes ephemeral private keys (the OS CSPRNG in production, a seed in tests)."""

    def generate(self, tep: Tep) -> PrivateKey:
        """Return a fresh private key for `tep`."""
        ...


class SystemKeyFactory:
    """Production keys from the library's generators (which use the OS CSPRNG)."""

    def generate(self, tep: Tep) -> PrivateKey:
        """Return a fresh private key for `tep`."""
        if tep == Tep.X25519:
            return x25519.X25519PrivateKey.generate()
        if tep == Tep.X448:
            return x448.X448PrivateKey.generate()
        return ec.generate_private_key(_CURVES[tep]())


class KeyPool:
    """Ephemeral private keys made ahead of need, while the daemon is idle (RFC 8548 §3.3, §8).

    Generating a key pair is the most expensive step of a fresh connection's packet path after the
    key agreement itself; the event loop fills this pool when no packet waits, and a connection
    takes a key from it. It saves time, never keys: every key is handed out once and is then gone
    from the pool. RFC 8548 §8 would allow reusing ephemeral keys for a limited lifetime; this
    implementation never reuses one. §3.3 asks that the keys be short-lived and never written to
    persistent storage: a key waits at most `max_age` seconds (the engine's timer drops it then),
    only in memory, and only for a TEP
    a connection used within the last `max_age` seconds (an idle daemon holds none); at most `size`
    per TEP (`size=0`: none, every key is made when a connection asks). `clear` empties the pool:
    the engine calls it with every resumption cache flush, so a machine restored from a snapshot or
    cloned (README: Resumption and cloned machines) never uses a key its original may use too.
    """

    def __init__(self, size: int = 4, max_age: float = 30.0) -> None:
        self.size = size
        self.max_age = max_age
        # (made at, private key, its public encoding): the encoding is made ahead too (RFC 8548 §5).
        self._ready: dict[Tep, deque[tuple[float, PrivateKey, bytes]]] = {}
        self._wanted: dict[Tep, float] = {}  # TEP -> when a connection last asked for a key of it
        self.taken = 0
        self.made = 0

    def __len__(self) -> int:
        return sum(len(ready) for ready in self._ready.values())

    def __repr__(self) -> str:
        return f"KeyPool(ready={len(self)}, taken={self.taken}, made={self.made})"

    def take(self, factory: KeyFactory, tep: Tep, now: float) -> PrivateKey:
        """A key nobody had: one made ahead (and young enough), else a new one from `factory`."""
        return self.take_pair(factory, tep, now)[0]

    def take_pair(self, factory: KeyFactory, tep: Tep, now: float) -> tuple[PrivateKey, bytes]:
        """As `take`, with the key's public encoding for Init1/Init2 (`public_bytes`), which a key
        made ahead carries already."""
        self._wanted[tep] = now
        ready = self._ready.get(tep)
        while ready:
            made, key, public = ready.popleft()
            if not ready:
                del self._ready[tep]
            if now - made < self.max_age:
                self.taken += 1
                return key, public
        key = factory.generate(tep)
        return key, public_bytes(tep, key)

    def wanted(self, now: float) -> Tep | None:
        """The TEP whose pool is short of `size` keys (only TEPs asked for recently), or None."""
        for tep, asked in self._wanted.items():
            if now - asked > self.max_age:
                continue
            ready = self._ready.get(tep)
            if (0 if ready is None else len(ready)) < self.size:
                return tep
        return None

    def next_expiry(self) -> float | None:
        """When the oldest key waiting passes `max_age` (the engine's timer drops it then), or None."""
        oldest: float | None = None
        for ready in self._ready.values():
            if ready and (oldest is None or ready[0][0] < oldest):
                oldest = ready[0][0]
        return None if oldest is None else oldest + self.max_age

    def expire(self, now: float) -> None:
        """Drop the keys made more than `max_age` seconds before `now`."""
        for tep, ready in list(self._ready.items()):
            while ready and now - ready[0][0] >= self.max_age:
                ready.popleft()
            if not ready:
                del self._ready[tep]

    def fill(self, factory: KeyFactory, now: float) -> bool:
        """Make one key for a TEP that wants one and drop keys past `max_age`; False: none needed."""
        self.expire(now)
        tep = self.wanted(now)
        if tep is None:
            return False
        key = factory.generate(tep)
        self._ready.setdefault(tep, deque()).append((now, key, public_bytes(tep, key)))
        self.made += 1
        return True

    def clear(self) -> int:
        """Forget every key made ahead; return how many went."""
        count = len(self)
        self._ready.clear()
        return count


_CURVES: Final[dict[Tep, type[ec.EllipticCurve]]] = {Tep.P256: ec.SECP256R1, Tep.P521: ec.SECP521R1}
# RFC 8548 §5: compressed point sizes (IEEE 1363 §E.2.3).
_POINT_LEN: Final = {Tep.P256: 33, Tep.P521: 67}
_RAW_LEN: Final = {Tep.X25519: 32, Tep.X448: 56}


def public_bytes(tep: Tep, private_key: PrivateKey) -> bytes:
    """Encode our public key as it appears in Init1/Init2 (RFC 8548 §5).

    X25519/X448 keys are raw. P-256/P-521 points are compressed and prefixed by `pubkey_len`.
    docs/protocol.md T2: we send the figure's reading, pubkey_len = the whole structure
    including its own two bytes (35 or 69), like Init1's message_len.
    """
    public = private_key.public_key()
    if tep in _RAW_LEN:
        return bytes(public.public_bytes_raw())
    point = bytes(public.public_bytes(Encoding.X962, PublicFormat.CompressedPoint))
    return struct.pack("!H", len(point) + 2) + point


def public_key_length(tep: Tep, data: bytes | memoryview) -> int:
    """Length of the public key at the start of `data` (the rest of the message is `ignored`)."""
    if tep in _RAW_LEN:
        return _RAW_LEN[tep]
    if len(data) < 2:
        raise MalformedSegment(f"public key truncated: {len(data)} bytes")
    (declared,) = struct.unpack_from("!H", data)
    point = _POINT_LEN[tep]
    # Ambiguity 2: accept both readings, with or without the prefix's own two bytes.
    if declared == point + 2 or declared == point:
        return point + 2
    raise MalformedSegment(f"pubkey_len {declared} does not fit a compressed {tep.name} point")


def shared_secret(tep: Tep, private_key: PrivateKey, peer_public: bytes) -> bytes:
    """ES of RFC 8548 §3.3: validate the peer's key (§5) and run the key agreement."""
    try:
        if tep == Tep.X25519:
            es = private_key.exchange(x25519.X25519PublicKey.from_public_bytes(peer_public))
        elif tep == Tep.X448:
            es = private_key.exchange(x448.X448PublicKey.from_public_bytes(peer_public))
        else:
            point = peer_public[2:]
            if len(point) != _POINT_LEN[tep] or point[0] not in (2, 3):
                raise ValueError("not a compressed point")
            peer = ec.EllipticCurvePublicKey.from_encoded_point(_CURVES[tep](), point)
            es = private_key.exchange(ec.ECDH(), peer)
    except ValueError as exc:
        raise RemoteProtocolError(f"peer public key rejected for {tep.name}: {exc}") from None
    # RFC 8548 §5 / RFC 7748 §6: an all-zero shared secret MUST abort.
    if not any(es):
        raise RemoteProtocolError(f"all-zero shared secret for {tep.name}")
    return bytes(es)


def extract(salt: bytes, ikm: bytes) -> bytes:
    """HKDF-Extract with SHA-256 (RFC 8548 §3.1, RFC 5869 §2.2)."""
    return _digest(salt, ikm)


def cprf(key: bytes | bytearray, info: bytes, length: int) -> bytes:
    """CPRF = HKDF-Expand-SHA256 (RFC 8548 §3.1, §5; RFC 5869 §2.3)."""
    if length <= 32:  # one block, T(1) (every CPRF of the protocol but 44-byte traffic keys)
        return _digest(key, info + b"\x01")[:length]
    if length > 255 * 32:
        raise ValueError(f"cprf length {length} exceeds 255 blocks")
    out = b""
    block = b""
    counter = 1
    while len(out) < length:
        block = _digest(key, block + info + bytes((counter,)))
        out += block
        counter += 1
    return out[:length]


_BLOCK: Final = 64  # SHA-256's block size
_IPAD: Final = bytes.maketrans(bytes(range(256)), bytes(b ^ 0x36 for b in range(256)))
_OPAD: Final = bytes.maketrans(bytes(range(256)), bytes(b ^ 0x5C for b in range(256)))


def hmac_sha256(key: bytes | bytearray, message: bytes | bytearray) -> bytes:
    """HMAC-SHA256 (RFC 2104 §2): H(K ^ opad | H(K ^ ipad | message)) with hashlib's SHA-256.

    Two hash calls: half the cost of `hmac.digest`, which fetches OpenSSL's HMAC afresh each time;
    the key schedule makes a dozen of these per connection."""
    if len(key) > _BLOCK:
        key = sha256(key).digest()
    block = bytes(key).ljust(_BLOCK, b"\0")
    inner = sha256(block.translate(_IPAD) + message).digest()
    return sha256(block.translate(_OPAD) + inner).digest()


_digest = hmac_sha256  # a module global, not a direct call: tests count the HMACs through it
# The CPRF info strings of the key schedule with HKDF-Expand's first counter byte (RFC 5869 §2.3).
_NEXTK_1: Final = bytes((CONST_NEXTK, 1))
_RESUME_1: Final = bytes((CONST_RESUME, 1))
_KEY_A_1: Final = bytes((CONST_KEY_A, 1))
_KEY_B_1: Final = bytes((CONST_KEY_B, 1))
_KEY_A_2: Final = bytes((CONST_KEY_A, 2))
_KEY_B_2: Final = bytes((CONST_KEY_B, 2))


def session_secret(n_a: bytes, transcript: bytes, init1: bytes, init2: bytes, es: bytes) -> bytes:
    """ss[0] = PRK = Extract(N_A, eno_transcript | Init1 | Init2 | ES) (RFC 8548 §3.3)."""
    return extract(n_a, transcript + init1 + init2 + es)


def next_session_secret(ss: bytes | bytearray) -> bytes:
    """ss[i] = CPRF(ss[i-1], CONST_NEXTK, K_LEN) (RFC 8548 §3.3): one HMAC block, K_LEN = 32."""
    return _digest(ss, _NEXTK_1)


def resume_identifier(ss: bytes | bytearray) -> bytes:
    """resume[i] = CPRF(ss[i], CONST_RESUME, 18) (RFC 8548 §3.5)."""
    return _digest(ss, _RESUME_1)[:18]


def traffic_keys(mk: bytes | bytearray, length: int) -> tuple[bytes, bytes]:
    """k_ab, k_ba = CPRF(mk[j], CONST_KEY_A / CONST_KEY_B, ae_key_len + ae_nonce_len) (RFC 8548 §3.3):
    one HMAC block each up to 32 bytes, two for the 44 bytes of a 256-bit key."""
    k_ab = _digest(mk, _KEY_A_1)
    k_ba = _digest(mk, _KEY_B_1)
    if length > 32:  # T(2) = HMAC(mk, T(1) | info | 0x02) (RFC 5869 §2.3)
        if length > 64:
            raise ValueError(f"traffic key length {length} exceeds two blocks")
        k_ab += _digest(mk, k_ab + _KEY_A_2)
        k_ba += _digest(mk, k_ba + _KEY_B_2)
    return k_ab[:length], k_ba[:length]


class TrafficKeys:
    """One key set j: the AEAD key and nonce randomizer for each direction (RFC 8548 §3.3, §3.8).

    Never in a repr; `wipe` zeroes them (best effort: the AEAD objects keep their own copies).
    A plain class: a compiled dataclass's constructor is interpreted Python."""

    __slots__ = ("k_ab", "k_ba")

    def __init__(self, k_ab: bytearray, k_ba: bytearray) -> None:
        self.k_ab = k_ab
        self.k_ba = k_ba

    def wipe(self) -> None:
        """Zero both keys."""
        wipe(self.k_ab)
        wipe(self.k_ba)

    def __repr__(self) -> str:
        return "TrafficKeys()"


def wipe(secret: bytearray) -> None:
    """Overwrite a secret held in a bytearray with zeros (best-effort erasure)."""
    secret[:] = bytes(len(secret))


class KeySchedule:
    """Master keys mk[j] of one session and the traffic keys derived from them (RFC 8548 §3.3, §3.8)."""

    __slots__ = ("_traffic_key_len", "_mk", "_generation", "session_id")

    def __init__(self, ss: bytes | bytearray, sn: bytes, tep_byte: int, traffic_key_len: int) -> None:
        self._traffic_key_len = traffic_key_len
        # mk[0] = CPRF(ss, CONST_REKEY | sn, K_LEN); session ID = TEP byte | CPRF(ss, CONST_SESSID | sn, K_LEN).
        self._mk = bytearray(_digest(ss, bytes((CONST_REKEY,)) + sn + b"\x01"))
        self._generation = 0
        self.session_id = bytes((tep_byte,)) + _digest(ss, bytes((CONST_SESSID,)) + sn + b"\x01")

    def keys(self, generation: int) -> TrafficKeys:
        """Traffic keys of `generation`; generations only move forward (old master keys are erased)."""
        if generation < self._generation:
            raise ValueError(f"generation {generation} is older than {self._generation}")
        while self._generation < generation:
            mk = bytearray(cprf(self._mk, bytes((CONST_REKEY,)), K_LEN))
            wipe(self._mk)
            self._mk = mk
            self._generation += 1
        k_ab, k_ba = traffic_keys(self._mk, self._traffic_key_len)
        return TrafficKeys(bytearray(k_ab), bytearray(k_ba))

    def wipe(self) -> None:
        """Zero the master key (the session ended)."""
        wipe(self._mk)

    def __repr__(self) -> str:
        return f"KeySchedule(generation={self._generation})"
