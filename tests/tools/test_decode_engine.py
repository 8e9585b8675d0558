"""decode on captures the engines themselves produce: every TEP/AEAD pair, rekeyed, resumed."""

from __future__ import annotations

import hashlib
import itertools

import pytest

from nfq_tcpcrypt.core.constants import AEAD_NAMES, Aead, Tep
from nfq_tcpcrypt.lab.tcpmodel import Pair, seeded_config
from nfq_tcpcrypt.tools.decode import decode_pcap
from tests.tools.captures import write_pcap


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _pair(log: list[str], **config) -> Pair:
    pair = Pair(a_config=seeded_config(b"da", secrets_log=log.append, **config),
                b_config=seeded_config(b"db", secrets_log=log.append, **config))
    pair.open()
    return pair


def _talk(pair: Pair, a_data: bytes, b_data: bytes) -> list[bytes]:
    pair.talk(a_data, b_data)
    pair.close()
    return list(pair.wire)


def _decode(tmp_path, wire: list[bytes], log: list[str]):
    keys = tmp_path / "keys"
    keys.write_text("# nfq-tcpcrypt key log\n" + "\n".join(dict.fromkeys(log)) + "\n")
    report = decode_pcap(write_pcap(tmp_path / "c.pcap", wire), str(keys))
    assert report.problems == [] and len(report.connections) == 1
    conn = report.connections[0]
    assert conn.problems == [], conn.problems
    return conn


@pytest.mark.parametrize("tep, aead", list(itertools.product(Tep, Aead)))
def test_every_tep_and_aead(tmp_path, tep, aead):
    log: list[str] = []
    pair = _pair(log, teps=(tep,), aeads=(aead,))
    a_data, b_data = b"a" * 7000, bytes(range(256)) * 20
    conn = _decode(tmp_path, _talk(pair, a_data, b_data), log)
    assert conn.tep == int(tep) and conn.aead_name == AEAD_NAMES[aead]
    assert conn.session_id == pair.engine_a.session_table()[0]["session_id"]
    client, server = conn.directions
    assert client.plaintext_sha256 == _sha(a_data) and server.plaintext_sha256 == _sha(b_data)


def test_rekeyed_both_directions(tmp_path):
    log: list[str] = []
    pair = _pair(log, rekey_bytes=8000)
    wire = []
    for i in range(4):  # one rekey per round trip, both ways
        pair.talk(bytes([i]) * 9000, bytes([i + 100]) * 9000)
        wire += pair.wire
        pair.wire = []
    pair.a.close()
    pair.b.close()
    pair.run()
    wire += pair.wire
    conn = _decode(tmp_path, wire, log)
    client, server = conn.directions
    assert len(client.rekeys) >= 3 and len(server.rekeys) >= 3
    assert client.plaintext_sha256 == _sha(b"".join(bytes([i]) * 9000 for i in range(4)))
    assert server.plaintext_sha256 == _sha(b"".join(bytes([i + 100]) * 9000 for i in range(4)))
    assert client.failed == server.failed == 0


@pytest.mark.parametrize("b_opens", [False, True])
def test_resumed(tmp_path, b_opens):
    log: list[str] = []
    pair = _pair(log)
    _talk(pair, b"first", b"first reply")
    pair.new_connection(40001, 81, b_opens=b_opens)
    wire = _talk(pair, b"second" * 1000, b"second reply" * 500)
    conn = _decode(tmp_path, wire, log)
    assert conn.resumed and conn.key_source.startswith("key log")
    assert conn.session_id == next(s for s in pair.engine_a.session_table() if s["resumed"])["session_id"]
    opener, answerer = conn.directions  # the client direction is the active opener's
    sent = (b"second reply" * 500, b"second" * 1000) if b_opens else (b"second" * 1000, b"second reply" * 500)
    assert opener.plaintext_sha256 == _sha(sent[0]) and answerer.plaintext_sha256 == _sha(sent[1])


def test_retransmission_with_different_bytes_is_flagged(tmp_path):
    """A segment resent at the same offset with other bytes (an injected forgery) is a problem;
    genuine retransmissions (byte-identical) are not."""
    from nfq_tcpcrypt.core.wire.tcp import parse_segment, serialize_segment
    from nfq_tcpcrypt.lab.tcpmodel import A_IP

    log: list[str] = []
    wire = _talk(_pair(log), b"q" * 20_000, b"r" * 100)
    index = next(i for i, p in enumerate(wire) if parse_segment(p).src == A_IP and len(parse_segment(p).payload) > 1000)
    genuine = wire[:index + 1] + [wire[index]] + wire[index + 1 :]
    conn = _decode(tmp_path, genuine, log)
    assert conn.problems == []
    forged = parse_segment(wire[index])
    payload = bytearray(forged.payload)
    payload[100] ^= 0xFF
    forged.payload = bytes(payload)
    keys = tmp_path / "keys"
    report = decode_pcap(write_pcap(tmp_path / "f.pcap", wire[:index + 1] + [serialize_segment(forged)]
                                    + wire[index + 1 :]), str(keys))
    problems = report.connections[0].problems
    assert [p.kind for p in problems] == ["retransmission-differs"], problems
    assert problems[0].packet == index + 2 and "1 bytes" in problems[0].message
