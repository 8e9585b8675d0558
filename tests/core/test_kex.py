"""Key schedule of RFC 8548 §3.3–§3.5 against the vectors of tests/vectors.py."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from cryptography.hazmat.primitives.asymmetric import x25519

from nfq_tcpcrypt.core import kex
from nfq_tcpcrypt.core.aead import FrameCipher, traffic_key_len
from nfq_tcpcrypt.core.constants import Aead, Tep
from nfq_tcpcrypt.core.errors import IntegrityError, RemoteProtocolError
from nfq_tcpcrypt.core.wire.tcpcrypt import Init1, Init2, serialize_init1, serialize_init2
from tests import vectors as v


def _x25519(private: bytes):
    return x25519.X25519PrivateKey.from_private_bytes(private)


def test_hkdf_rfc5869_a1():
    prk = kex.extract(v.HKDF_SALT, v.HKDF_IKM)
    assert prk == v.HKDF_PRK
    assert kex.cprf(prk, v.HKDF_INFO, len(v.HKDF_OKM)) == v.HKDF_OKM


def test_hmac_sha256_rfc4231_and_hmac_module():
    """RFC 4231 §4.2 and §4.7 (a key longer than the block), and the hmac module for keys of
    every length around SHA-256's 64-byte block."""
    assert kex.hmac_sha256(b"\x0b" * 20, b"Hi There") == bytes.fromhex(
        "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7")
    assert kex.hmac_sha256(b"\xaa" * 131, b"Test Using Larger Than Block-Size Key - Hash Key First") == bytes.fromhex(
        "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54")
    for length in (0, 1, 18, 32, 63, 64, 65, 100, 200):
        key = bytes(range(length % 256)) * (1 + length // 256)
        for message in (b"", b"\x01", bytes(range(200))):
            assert kex.hmac_sha256(bytearray(key), message) == hmac.digest(key, message, "sha256")


def test_x25519_rfc7748():
    assert kex.public_bytes(Tep.X25519, _x25519(v.X25519_A_PRIVATE)) == v.X25519_A_PUBLIC
    es = kex.shared_secret(Tep.X25519, _x25519(v.X25519_A_PRIVATE), v.X25519_B_PUBLIC)
    assert es == v.X25519_SHARED


def _fresh_session():
    init1 = serialize_init1(Init1((Aead.AES_128_GCM,), v.N_A, v.X25519_A_PUBLIC))
    init2 = serialize_init2(Init2(Aead.AES_128_GCM, v.N_B, v.X25519_B_PUBLIC))
    return init1, init2


def test_fresh_key_schedule_vectors():
    init1, init2 = _fresh_session()
    assert (len(init1), len(init2)) == (v.INIT1_LEN, v.INIT2_LEN)
    ss = kex.session_secret(v.N_A, v.ENO_TRANSCRIPT, init1, init2, v.X25519_SHARED)
    assert ss == v.SS0
    schedule = kex.KeySchedule(ss, b"", 0x23, traffic_key_len(Aead.AES_128_GCM))
    keys = schedule.keys(0)
    assert (keys.k_ab, keys.k_ba) == (v.K_AB0, v.K_BA0)
    assert schedule.session_id == v.SESSION_ID0
    assert len(schedule.session_id) == 33
    assert schedule.keys(1).k_ab == v.K_AB1
    with pytest.raises(ValueError):
        schedule.keys(0)  # old master keys are gone


@pytest.mark.parametrize("aead", list(Aead))
def test_key_schedule_equals_hkdf_expand_for_every_key_length(aead):
    """The schedule's one-block shortcuts against the library's HKDF-Expand (RFC 5869 §2.3), for
    28- and 44-byte traffic keys (two blocks), a later generation and a resumed session's sn."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

    def expand(key: bytes, info: bytes, length: int) -> bytes:
        return HKDFExpand(hashes.SHA256(), length, info).derive(key)

    length = traffic_key_len(aead)
    for ss, sn in ((v.SS0, b""), (v.SS1, v.NONCE_A + v.NONCE_B)):
        schedule = kex.KeySchedule(bytearray(ss), sn, 0x23, length)
        assert schedule.session_id == bytes((0x23,)) + expand(ss, bytes((0x02,)) + sn, 32)
        mk0 = expand(ss, bytes((0x03,)) + sn, 32)
        mk2 = expand(expand(mk0, bytes((0x03,)), 32), bytes((0x03,)), 32)
        for generation, mk in ((0, mk0), (2, mk2)):
            keys = schedule.keys(generation)
            assert keys.k_ab == expand(mk, bytes((0x04,)), length)
            assert keys.k_ba == expand(mk, bytes((0x05,)), length)
        assert kex.next_session_secret(bytearray(ss)) == expand(ss, bytes((0x01,)), 32)
        assert kex.resume_identifier(ss) == expand(ss, bytes((0x06,)), 18)


def test_first_frame_vector_and_tamper():
    cipher = FrameCipher(Aead.AES_128_GCM, v.K_AB0)
    frame = cipher.seal(v.FIRST_FRAME_OFFSET, v.FIRST_FRAME_PLAINTEXT)
    assert frame == v.FIRST_FRAME
    assert cipher.open(v.FIRST_FRAME_OFFSET, frame) == v.FIRST_FRAME_PLAINTEXT
    flipped = bytearray(frame)
    flipped[5] ^= 1
    with pytest.raises(IntegrityError):
        cipher.open(v.FIRST_FRAME_OFFSET, bytes(flipped))
    with pytest.raises(IntegrityError):  # the nonce depends on the offset
        cipher.open(v.FIRST_FRAME_OFFSET + 1, frame)


def test_resumption_vectors():
    ss1 = kex.next_session_secret(v.SS0)
    assert ss1 == v.SS1
    resume = kex.resume_identifier(ss1)
    assert resume == v.RESUME1
    assert bytes((0xA3,)) + resume[:9] + v.NONCE_A == v.RESUMED_SUBOPT_A
    assert bytes((0xA3,)) + resume[9:] + v.NONCE_B == v.RESUMED_SUBOPT_B
    schedule = kex.KeySchedule(ss1, v.NONCE_A + v.NONCE_B, 0xA3, traffic_key_len(Aead.AES_128_GCM))
    keys = schedule.keys(0)
    assert (keys.k_ab, keys.k_ba) == (v.RESUMED_K_AB0, v.RESUMED_K_BA0)
    assert schedule.session_id == v.RESUMED_SESSION_ID
    assert kex.next_session_secret(ss1) == v.SS2


def test_all_zero_and_bad_keys_are_rejected():
    me = _x25519(v.X25519_A_PRIVATE)
    with pytest.raises(RemoteProtocolError):
        kex.shared_secret(Tep.X25519, me, bytes(32))  # low-order point: all-zero secret
    with pytest.raises(RemoteProtocolError):
        kex.shared_secret(Tep.X25519, me, bytes(31))


@pytest.mark.parametrize("tep", list(Tep))
def test_every_tep_agrees(tep):
    factory = kex.SystemKeyFactory()
    a, b = factory.generate(tep), factory.generate(tep)
    pa, pb = kex.public_bytes(tep, a), kex.public_bytes(tep, b)
    assert kex.public_key_length(tep, pa + b"trailer") == len(pa)
    assert kex.shared_secret(tep, a, pb) == kex.shared_secret(tep, b, pa)


class _CountingFactory:
    """Distinct X25519 keys from a counter, and how many were made."""

    def __init__(self) -> None:
        self.made = 0

    def generate(self, tep: Tep):  # type: ignore[no-untyped-def]
        self.made += 1
        return _x25519(hashlib.sha256(self.made.to_bytes(8, "big")).digest())


def _raw(key) -> bytes:  # type: ignore[no-untyped-def]
    return kex.public_bytes(Tep.X25519, key)


def test_key_pool_hands_each_key_out_once_and_only_fills_for_teps_in_use():
    factory, pool = _CountingFactory(), kex.KeyPool(size=3, max_age=30.0)
    assert pool.wanted(0.0) is None and not pool.fill(factory, 0.0)  # nothing asked: nothing made
    first = pool.take(factory, Tep.X25519, 0.0)  # an empty pool makes one at once
    assert factory.made == 1 and pool.wanted(0.0) is Tep.X25519 and pool.next_expiry() is None
    while pool.fill(factory, 1.0):
        pass
    assert len(pool) == 3 and factory.made == 4
    taken = [pool.take(factory, Tep.X25519, 2.0) for _ in range(5)]
    publics = [_raw(k) for k in [first, *taken]]
    assert len(set(publics)) == 6  # never the same key twice
    assert pool.taken == 3 and factory.made == 6  # three from the pool, two made on the spot
    assert "KeyPool(" in repr(pool) and "private" not in repr(pool).lower()


def test_key_pool_hands_out_each_key_with_its_own_public_encoding():
    factory, pool = _CountingFactory(), kex.KeyPool(size=2, max_age=30.0)
    pairs = [pool.take_pair(factory, Tep.X25519, 0.0)]  # made on the spot
    while pool.fill(factory, 0.0):
        pass
    pairs += [pool.take_pair(factory, Tep.X25519, 1.0) for _ in range(3)]  # two made ahead, one not
    assert pool.taken == 2 and factory.made == 4
    assert all(public == _raw(key) for key, public in pairs)
    assert len({public for _, public in pairs}) == 4

def test_key_pool_keys_age_out_and_an_idle_daemon_holds_none():
    factory, pool = _CountingFactory(), kex.KeyPool(size=2, max_age=30.0)
    pool.take(factory, Tep.X25519, 0.0)
    while pool.fill(factory, 0.0):
        pass
    assert len(pool) == 2
    old = factory.made
    fresh = pool.take(factory, Tep.X25519, 31.0)  # the ones made at 0 are too old: a new key
    assert factory.made == old + 1 and pool.taken == 0 and _raw(fresh)
    assert not pool.fill(factory, 62.0) and len(pool) == 0  # no connection asked for 31 s: none kept
    pool.take(factory, Tep.X25519, 70.0)
    pool.fill(factory, 70.0)
    assert len(pool) == 1 and pool.clear() == 1 and len(pool) == 0
    pool.take(factory, Tep.X25519, 80.0)
    pool.fill(factory, 80.0)
    assert pool.next_expiry() == 110.0
    pool.expire(109.0)
    assert len(pool) == 1
    pool.expire(110.0)  # the engine's timer: gone at max_age, whether or not anything asks
    assert len(pool) == 0 and pool.next_expiry() is None
    none = kex.KeyPool(size=0)  # a worker's (shell/workers.py): keys only when a connection asks
    none.take(factory, Tep.X25519, 0.0)
    assert none.wanted(0.0) is None and not none.fill(factory, 0.0) and len(none) == 0


def test_engine_makes_keys_ahead_uses_them_once_and_forgets_them_on_a_cache_flush():
    from nfq_tcpcrypt.lab.tcpmodel import Pair, seeded_config

    pair = Pair(seed=b"pool", a_config=seeded_config(b"pa", resume=False),
                b_config=seeded_config(b"pb", resume=False))
    pair.open()
    pair.talk(b"first", b"ok")
    engines = [pair.engine_a, pair.engine_b]
    for engine in engines:
        assert engine is not None and engine.prepare_wanted(pair.now)  # a fresh connection asked
        while engine.prepare(pair.now):
            pass
        assert len(engine.keys) == engine.keys.size
        timer = engine.get_timer()
        assert timer is not None and timer <= pair.now + engine.keys.max_age
    pair.new_connection(20001, 80)
    pair.talk(b"second", b"ok")
    assert bytes(pair.b.received) == b"second"
    ids = set()
    for engine in engines:
        assert engine is not None and engine.keys.taken == 1  # A's Init1 key and B's Init2 key
        ids |= {s["session_id"] for s in engine.session_table()}
        engine.flush_cache("test")
        assert len(engine.keys) == 0 and engine.keys.made == engine.keys.size
    assert len(ids) == 2  # both connections' sessions agree across the engines, and differ
    engine = pair.engine_a
    assert engine is not None
    while engine.prepare(pair.now):
        pass
    engine.handle_timer(pair.now + engine.keys.max_age)  # unused keys go with the engine's timer
    assert len(engine.keys) == 0
