"""Property tests: every codec round-trips; random bytes raise only our own errors."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from nfq_tcpcrypt.core.constants import Tep
from nfq_tcpcrypt.core.errors import TcpcryptError
from nfq_tcpcrypt.core.seqmap import to_offset, to_seq
from nfq_tcpcrypt.core.wire.eno import EnoOption, TepSuboption, parse_eno, serialize_eno
from nfq_tcpcrypt.core.wire.tcp import new_segment, parse_options, parse_segment, serialize_options, serialize_segment
from nfq_tcpcrypt.core.wire.tcpcrypt import Init1, Init2, parse_init1, parse_init2, serialize_init1, serialize_init2

tep_ids = st.integers(0x20, 0x7F)
fresh = st.builds(TepSuboption, tep_ids)
with_data = st.builds(lambda t, d: TepSuboption(t, d, True), tep_ids, st.binary(min_size=1, max_size=32))


@st.composite
def eno_options(draw):
    glob = draw(st.one_of(st.none(), st.integers(0, 0x1F)))
    subs = draw(st.lists(st.one_of(fresh, with_data), max_size=4))
    tail = st.builds(lambda t, d: TepSuboption(t, d, True), tep_ids, st.binary(min_size=1, max_size=20))
    last = draw(st.one_of(st.none(), tail))
    teps = tuple(subs) + ((last,) if last else ())
    option = EnoOption(glob, teps)
    try:
        raw = serialize_eno(option)
    except ValueError:
        raw = None
    return option, raw


@given(eno_options())
def test_eno_round_trip(pair):
    option, raw = pair
    if raw is None:
        return
    parsed = parse_eno(raw)
    assert parsed.teps == option.teps and parsed.global_byte == option.global_byte
    assert serialize_eno(parsed) == raw


@given(st.binary(max_size=42))
def test_eno_random_bytes(raw):
    try:
        parse_eno(bytes((69, len(raw) + 2)) + raw)
    except TcpcryptError:
        pass


@given(st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=20), st.binary(min_size=32, max_size=32),
       st.binary(min_size=32, max_size=32), st.binary(max_size=50))
def test_init_round_trip(ciphers, nonce, key, ignored):
    msg = Init1(tuple(ciphers), nonce, key, ignored)
    assert parse_init1(serialize_init1(msg), Tep.X25519) == msg
    msg2 = Init2(ciphers[0], nonce, key, ignored)
    assert parse_init2(serialize_init2(msg2), Tep.X25519) == msg2


@given(st.binary(max_size=200), st.sampled_from(list(Tep)))
def test_init_random_bytes(data, tep):
    for parse in (parse_init1, parse_init2):
        try:
            parse(data, tep)
        except TcpcryptError:
            pass


@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 0xFF), st.integers(0, 0xFFFF),
       st.binary(max_size=1500), st.booleans())
def test_segment_round_trip(seq, ack, flags, window, payload, v6):
    src, dst = (bytes(15) + b"\x01", bytes(15) + b"\x02") if v6 else (b"\x0a\x00\x00\x01", b"\x0a\x00\x00\x02")
    options = b"\x01\x01\x08\x0a" + bytes(8)
    raw = serialize_segment(new_segment(src, dst, 1, 2, seq, ack, flags, window, options, payload))
    seg = parse_segment(raw, verify_checksum=True)
    assert (seg.seq, seg.ack, seg.flags, seg.window, seg.payload) == (seq, ack, flags, window, payload)
    assert serialize_options(parse_options(seg.options)) == seg.options


@given(st.binary(max_size=120))
def test_segment_random_bytes(data):
    try:
        parse_segment(data, verify_checksum=True)
    except TcpcryptError:
        pass


@given(st.integers(0, 2**32 - 1), st.integers(-(2**40), 2**40), st.integers(-(2**30), 2**30))
def test_seq_offsets_across_the_wrap(base, near, delta):
    offset = near + delta
    assert to_offset(to_seq(offset, base), base, near) == offset
