"""Two engines talk to each other in memory through the TCP model."""

from __future__ import annotations

import os

from nfq_tcpcrypt.core.constants import INIT1_MAGIC, INIT2_MAGIC
from nfq_tcpcrypt.core.events import FellBackToPlain, SessionClosed, SessionEstablished
from nfq_tcpcrypt.core.wire.tcp import parse_options, parse_segment
from nfq_tcpcrypt.lab.tcpmodel import A_IP, B_IP, Pair


def _stream(wire: list[bytes], src: bytes) -> bytes:
    data = bytearray()
    seen = set()
    for packet in wire:
        seg = parse_segment(packet)
        if seg.src == src and seg.payload and seg.seq not in seen:
            seen.add(seg.seq)
            data += seg.payload
    return bytes(data)


def _transfer(pair: Pair, a_data: bytes, b_data: bytes) -> None:
    pair.open()
    pair.talk(a_data, b_data)
    pair.close()


def test_encrypted_transfer_both_ways():
    pair = Pair()
    a_data, b_data = os.urandom(100_000), os.urandom(30_000)
    _transfer(pair, a_data, b_data)
    assert bytes(pair.b.received) == a_data
    assert bytes(pair.a.received) == b_data
    assert pair.a.peer_fin and pair.b.peer_fin and not pair.a.was_reset and not pair.b.was_reset
    a_stream, b_stream = _stream(pair.wire, A_IP), _stream(pair.wire, B_IP)
    assert a_stream[:4] == INIT1_MAGIC.to_bytes(4, "big")
    assert b_stream[:4] == INIT2_MAGIC.to_bytes(4, "big")
    assert a_data[:64] not in a_stream and b_data[:64] not in b_stream
    syn, synack = (parse_segment(p) for p in pair.wire[:2])
    assert any(k == 69 for k, _ in parse_options(syn.options))
    assert any(k == 69 for k, _ in parse_options(synack.options))
    ea, eb = pair.events(pair.engine_a), pair.events(pair.engine_b)
    ida = [e.session_id for e in ea if isinstance(e, SessionEstablished)]
    idb = [e.session_id for e in eb if isinstance(e, SessionEstablished)]
    assert ida == idb and len(ida[0]) == 66
    assert any(isinstance(e, SessionClosed) for e in ea)
    table_a, table_b = pair.engine_a.session_table(), pair.engine_b.session_table()
    assert table_a[0]["session_id"] == table_b[0]["session_id"] == ida[0]
    assert table_a[0]["bytes_out"] == len(a_data) == table_b[0]["bytes_in"]
    assert (table_a[0]["role"], table_b[0]["role"]) == ("A", "B")


def test_same_seed_same_transcript():
    wires = []
    for _ in range(2):
        pair = Pair(seed=b"fixed")
        _transfer(pair, b"x" * 5000, b"y" * 10)
        wires.append(pair.wire)
    assert wires[0] == wires[1]


def test_plain_peer_without_engine_stays_plain():
    for a_engine, b_engine in ((True, False), (False, True)):
        pair = Pair(a_engine=a_engine, b_engine=b_engine)
        data = os.urandom(20_000)
        _transfer(pair, data, b"reply")
        assert bytes(pair.b.received) == data and bytes(pair.a.received) == b"reply"
        assert data[:64] in _stream(pair.wire, A_IP)
        engine = pair.engine_a or pair.engine_b
        assert any(isinstance(e, FellBackToPlain) for e in pair.events(engine))
