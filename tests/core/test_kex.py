"""Key schedule of RFC 8548 §3.3–§3.5 against the vectors of tests/vectors.py."""

from __future__ import annotations

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
