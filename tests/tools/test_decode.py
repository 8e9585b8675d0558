"""`decode` against captures of real engine sessions and hand-broken variants of them."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import struct

import pytest

from nfq_tcpcrypt.core.aead import FrameCipher, traffic_key_len
from nfq_tcpcrypt.core.constants import TCP_ACK, TCP_FIN, TCP_PSH, TCP_SYN, Aead
from nfq_tcpcrypt.core.kex import KeySchedule, next_session_secret, resume_identifier, session_secret
from nfq_tcpcrypt.core.wire.eno import NON_SYN_ENO, EnoOption, TepSuboption, serialize_eno
from nfq_tcpcrypt.core.wire.tcp import new_segment, parse_options, parse_segment, serialize_segment
from nfq_tcpcrypt.lab.tcpmodel import A_IP, B_IP
from nfq_tcpcrypt.tools.decode import add_parser, decode_pcap, render_json, render_text, run
from tests.tools.captures import (
    data_packets,
    ethernet,
    run_session,
    sll,
    sll2,
    stream_offset,
    to_ipv6,
    with_payload,
    write_pcap,
    write_pcapng,
)

A_DATA = bytes(random.Random(1).getrandbits(8) for _ in range(60_000))
B_DATA = b"HTTP/1.0 200 OK\r\n\r\n" + bytes(range(256)) * 8


@pytest.fixture(scope="module")
def fresh():
    return run_session(A_DATA, B_DATA)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _kinds(conn) -> list[str]:
    return [p.kind for p in conn.problems]


def _decode(tmp_path, session, packets=None, keylog=True, **kwargs):
    path = write_pcap(tmp_path / "c.pcap", session.wire if packets is None else packets)
    log = session.write_keylog(tmp_path / "keys") if keylog else None
    return decode_pcap(path, log, **kwargs)


def _check_fresh_decrypted(report, session) -> None:
    assert report.problems == [] and len(report.connections) == 1
    conn = report.connections[0]
    assert conn.problems == [], conn.problems
    assert conn.status == "encrypted" and not conn.resumed and conn.handshake == "complete"
    assert conn.session_id == session.session_id
    client, server = conn.directions
    assert client.plaintext_sha256 == _sha(session.a_data) and client.plaintext_complete
    assert server.plaintext_sha256 == _sha(session.b_data) and server.plaintext_complete
    for d in conn.directions:
        assert d.framing == "init+frames" and d.framing_valid and d.frames == d.verified > 0
        assert d.failed == d.undecrypted == d.unparsed_bytes == 0
        assert d.finp_offset is not None and d.fin_offset == d.stream_bytes
        assert not d.could_be_plaintext


# ---------------------------------------------------------------------------- fresh sessions


def test_fresh_session_decrypted_with_key_log(tmp_path, fresh):
    report = _decode(tmp_path, fresh)
    _check_fresh_decrypted(report, fresh)
    conn = report.connections[0]
    assert (conn.client, conn.server) == ("10.77.0.1:40000", "10.77.0.2:80")
    assert conn.syn_eno.raw == "450323" and conn.syn_eno.b is False
    assert conn.synack_eno.b is True and [s.tep for s in conn.synack_eno.suboptions] == [0x23]
    assert conn.ack_eno is True and conn.role_a == "client" and conn.tep == 0x23 and conn.tep_byte == 0x23
    assert conn.init1.length == 75 and conn.init1.sym_ciphers == [1] and conn.init1.packet == 3
    assert conn.init2.length == 74 and conn.init2.sym_ciphers == [1]
    assert conn.aead_name == "aes128gcm" and conn.key_source == "key log (ES)"
    client, server = conn.directions
    assert (client.role, server.role) == ("A", "B")
    assert client.isn == parse_segment(fresh.wire[0]).seq
    # the first frame of A follows Init1 directly (frame-ID offsets count the Init bytes)
    assert client.finp_offset == client.stream_bytes - 3 - client.clen_min
    # one frame per packet after init1
    assert client.rekeys == [] and client.verified == len(data_packets(fresh.wire)) - 1


def test_without_key_log_framing_only(tmp_path, fresh):
    report = _decode(tmp_path, fresh, keylog=False)
    conn = report.connections[0]
    assert conn.status == "encrypted" and conn.session_id is None and conn.key_problem == "no key log"
    assert conn.problems == [] and report.problem_count == 0
    for d in conn.directions:
        assert d.framing_valid and d.frames > 0 and d.verified == 0 and d.undecrypted == d.frames
        assert d.plaintext_sha256 is None and not d.could_be_plaintext
        assert d.printable_ratio < 0.6
    text = render_text(report)
    assert "no key: frames not verified, no plaintext" in text and "no plaintext outside the frames" in text


def test_key_log_without_this_session(tmp_path, fresh):
    other = tmp_path / "other"
    other.write_text("# comment\nES " + "11" * 32 + " " + "22" * 32 + "\nbogus line\n")
    report = decode_pcap(write_pcap(tmp_path / "c.pcap", fresh.wire), str(other))
    assert [p.kind for p in report.problems] == ["keylog"]
    assert report.connections[0].key_problem == "N_A not in the key log"


def test_write_plaintext(tmp_path, fresh):
    out = tmp_path / "plain"
    report = _decode(tmp_path, fresh, write_plaintext=str(out))
    client, server = report.connections[0].directions
    assert open(client.plaintext_file, "rb").read() == fresh.a_data
    assert open(server.plaintext_file, "rb").read() == fresh.b_data
    assert sorted(os.listdir(out)) == sorted(os.path.basename(d.plaintext_file) for d in (client, server))


@pytest.mark.parametrize("encap", ["pcapng", "ethernet", "sll", "sll2", "ipv6", "ipv6-ext", "pcapng-ethernet-ipv6"])
def test_encapsulations(tmp_path, fresh, encap):
    packets = fresh.wire
    if "ipv6" in encap:
        packets = [to_ipv6(p, hop_by_hop=encap == "ipv6-ext") for p in packets]
    if encap in ("ethernet", "pcapng-ethernet-ipv6"):
        packets, linktype = [ethernet(p) for p in packets], 1
    elif encap == "sll":
        packets, linktype = [sll(p) for p in packets], 113
    elif encap == "sll2":
        packets, linktype = [sll2(p) for p in packets], 276
    else:
        linktype = 229 if "ipv6" in encap else 101
    path = tmp_path / "c"
    if encap.startswith("pcapng"):
        name = write_pcapng(path, packets, linktype)
    else:
        name = write_pcap(path, packets, linktype)
    report = decode_pcap(name, fresh.write_keylog(tmp_path / "keys"))
    assert report.format == ("pcapng" if encap.startswith("pcapng") else "pcap")
    assert report.linktypes == [linktype]
    _check_fresh_decrypted(report, fresh)
    if "ipv6" in encap:
        assert report.connections[0].client == "[fd00::1]:40000"


def test_reordered_duplicated_retransmitted(tmp_path, fresh):
    rng = random.Random(7)
    packets = list(fresh.wire)
    head, body = packets[:4], packets[4:]
    for i in range(0, len(body) - 4, 5):  # swap neighbours, duplicate some, in bounded windows
        window = body[i : i + 5]
        rng.shuffle(window)
        body[i : i + 5] = window
    dups = [body[i] for i in range(0, len(body), 7)]
    body += dups  # late retransmissions
    # a retransmission that overlaps two segments: the end of one and the start of the next
    a_idx = data_packets(packets)[3:5]
    s1, s2 = parse_segment(packets[a_idx[0]]), parse_segment(packets[a_idx[1]])
    if (s1.seq + len(s1.payload)) & 0xFFFFFFFF == s2.seq:
        overlap = with_payload(packets[a_idx[0]], s1.payload[100:] + s2.payload[:50])
        seg = parse_segment(overlap)
        seg.seq = (s1.seq + 100) & 0xFFFFFFFF
        body.insert(len(body) // 2, serialize_segment(seg))
    report = _decode(tmp_path, fresh, head + body)
    _check_fresh_decrypted(report, fresh)
    assert report.connections[0].directions[0].repeated_bytes > 0


def test_json_schema_fields_and_cli(tmp_path, fresh, capsys):
    path = write_pcap(tmp_path / "c.pcap", fresh.wire)
    keys = fresh.write_keylog(tmp_path / "keys")
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["decode", path, "--keylog", keys, "--json"])
    assert args.func is run
    assert run(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["schema"] == "nfq-tcpcrypt-decode/1" and data["problem_count"] == 0
    conn = data["connections"][0]
    assert conn["session_id"] == fresh.session_id
    assert {"syn_eno", "synack_eno", "init1", "init2", "aead", "directions", "problems", "resumed"} <= set(conn)
    assert conn["directions"][0]["plaintext_sha256"] == _sha(fresh.a_data)
    # every key the schema document names is present
    schema = open(os.path.join(os.path.dirname(__import__("nfq_tcpcrypt.tools.decode").tools.decode.__file__),
                               "decode_schema.md")).read()
    for key in list(conn) + list(conn["directions"][0]) + list(data):
        assert f"`{key}`" in schema, key
    assert json.loads(render_json(decode_pcap(path))) is not None


# ---------------------------------------------------------------------------- damage


def test_flipped_bit_in_one_frame(tmp_path, fresh):
    packets = list(fresh.wire)
    index = data_packets(packets)[5]
    payload = bytearray(parse_segment(packets[index]).payload)
    payload[len(payload) // 2] ^= 0x10  # inside the ciphertext, the frame header stays intact
    packets[index] = with_payload(packets[index], bytes(payload))
    report = _decode(tmp_path, fresh, packets)
    conn = report.connections[0]
    failures = [p for p in conn.problems if p.kind == "tag-failure"]
    assert len(failures) == 1 and _kinds(conn) == ["tag-failure"]
    assert failures[0].packet == index + 1 and failures[0].side == "client"
    assert failures[0].offset == stream_offset(packets, index)
    client, server = conn.directions
    assert client.failed == 1 and client.verified == client.frames - 1
    assert not client.plaintext_complete and client.plaintext_bytes < len(fresh.a_data)
    assert server.plaintext_sha256 == _sha(fresh.b_data) and server.plaintext_complete
    assert report.problem_count == 1


def test_capture_missing_a_segment(tmp_path, fresh):
    packets = list(fresh.wire)
    index = data_packets(packets)[7]
    offset, length = stream_offset(packets, index), len(parse_segment(packets[index]).payload)
    del packets[index]
    report = _decode(tmp_path, fresh, packets)
    conn = report.connections[0]
    client = conn.directions[0]
    assert client.gaps == [{"offset": offset, "length": length, "packet": index + 1}]
    gap = next(p for p in conn.problems if p.kind == "gap")
    assert (gap.offset, gap.packet, gap.side) == (offset, index + 1, "client")
    assert "resynchronized" in _kinds(conn) and "tag-failure" not in _kinds(conn)
    # every frame but the lost one still verifies
    assert client.verified == client.frames and client.frames == len(data_packets(fresh.wire)) - 2
    assert not client.plaintext_complete and client.plaintext_bytes == len(fresh.a_data) - (length - 20)


def test_capture_missing_the_tail(tmp_path, fresh):
    last = data_packets(fresh.wire)[-1]
    packets = [p for i, p in enumerate(fresh.wire) if i != last]
    report = _decode(tmp_path, fresh, packets)
    conn = report.connections[0]
    client = conn.directions[0]
    assert client.gaps[-1]["packet"] == 0 and client.finp_offset is None  # known from the peer's ACK
    gap = next(p for p in conn.problems if p.kind == "gap")
    assert gap.packet is None and gap.offset == stream_offset(fresh.wire, last)


def test_fin_without_finp(tmp_path, fresh):
    last = data_packets(fresh.wire)[-1]
    assert parse_segment(fresh.wire[last]).flags & TCP_FIN
    packets = list(fresh.wire)
    packets[last] = with_payload(packets[last], b"")  # a bare FIN where the FINp frame was
    conn = _decode(tmp_path, fresh, packets).connections[0]
    assert "fin-without-finp" in _kinds(conn)
    assert conn.directions[0].fin_offset == stream_offset(fresh.wire, last)


def test_malformed_eno_option(tmp_path, fresh):
    packets = list(fresh.wire)
    syn = parse_segment(packets[0])
    options = parse_options(syn.options)
    raw = b"".join(b"\x45\x03\x8f" if kind == 69 else r for kind, r in options)  # length byte runs past
    packets[0] = with_payload(packets[0], b"", raw)
    report = _decode(tmp_path, fresh, packets)
    conn = report.connections[0]
    assert conn.status == "plain" and conn.syn_eno is None and "no valid ENO" in conn.reason
    bad = next(p for p in conn.problems if p.kind == "malformed-eno")
    assert bad.packet == 1 and "450 38f".replace(" ", "") in bad.message
    # treated as plain TCP: the (actually encrypted) payload is reported as what it is, raw bytes
    assert all(d.framing == "raw" and d.could_be_plaintext for d in conn.directions)


def test_truncated_init1(tmp_path, fresh):
    packets = list(fresh.wire)
    index = data_packets(packets)[0]
    init1 = parse_segment(packets[index]).payload
    assert init1[:4] == bytes.fromhex("15101a0e")
    packets = packets[:index] + [with_payload(packets[index], init1[:40])]
    report = _decode(tmp_path, fresh, packets)
    conn = report.connections[0]
    assert conn.status == "encrypted" and conn.init1 is None and conn.session_id is None
    trunc = next(p for p in conn.problems if p.kind == "truncated-init")
    assert (trunc.offset, trunc.packet, trunc.side) == (0, index + 1, "client")
    assert conn.directions[0].trailing_bytes == 40 and conn.key_problem


def test_init1_with_bad_magic_and_bad_length(tmp_path, fresh):
    packets = list(fresh.wire)
    index = data_packets(packets)[0]
    init1 = parse_segment(packets[index]).payload
    bad_magic = bytes(4) + init1[4:]
    damaged = packets[:index] + [with_payload(packets[index], bad_magic)] + packets[index + 1 :]
    report = _decode(tmp_path, fresh, damaged)
    conn = report.connections[0]
    assert "malformed-init" in _kinds(conn) and conn.session_id is None
    assert conn.directions[0].framing_valid is False
    short = init1[:4] + struct.pack("!I", 20) + init1[8:]  # message_len too short for its fields
    report = _decode(tmp_path, fresh, packets[:index] + [with_payload(packets[index], short)] + packets[index + 1 :])
    assert "malformed-init" in _kinds(report.connections[0])


def test_mid_connection_capture(tmp_path, fresh):
    report = _decode(tmp_path, fresh, fresh.wire[6:])
    conn = report.connections[0]
    assert conn.status == "unknown" and conn.handshake == "none"
    client = conn.directions[0]
    assert not client.offsets_exact and client.stream_bytes > 0 and client.printable_ratio < 0.6


def test_not_a_capture_and_truncated_file(tmp_path, fresh):
    junk = tmp_path / "junk"
    junk.write_bytes(b"this is not a capture at all")
    report = decode_pcap(str(junk))
    assert [p.kind for p in report.problems] == ["not-a-capture"] and report.connections == []
    assert decode_pcap(str(tmp_path / "missing")).problems[0].kind == "unreadable"
    whole = open(write_pcap(tmp_path / "c.pcap", fresh.wire), "rb").read()
    cut = tmp_path / "cut.pcap"
    cut.write_bytes(whole[: len(whole) // 2])
    report = decode_pcap(str(cut), fresh.write_keylog(tmp_path / "keys"))
    assert "truncated-file" in [p.kind for p in report.problems]
    assert report.connections[0].session_id == fresh.session_id  # what was read is still decoded


def test_random_damage_never_crashes(tmp_path, fresh):
    whole = bytearray(open(write_pcap(tmp_path / "c.pcap", fresh.wire[:40]), "rb").read())
    rng = random.Random(3)
    keys = fresh.write_keylog(tmp_path / "keys")
    for round_ in range(60):
        data = bytearray(whole)
        for _ in range(rng.randint(1, 30)):
            data[rng.randrange(24, len(data))] = rng.randrange(256)
        path = tmp_path / f"d{round_}.pcap"
        path.write_bytes(bytes(data))
        report = decode_pcap(str(path), keys)
        assert not [p for p in report.problems if p.kind == "internal-error"], report.problems
        render_text(report)
        render_json(report)


# ---------------------------------------------------------------------------- plain TCP


def test_plain_connection(tmp_path):
    text = b"GET / HTTP/1.0\r\nHost: example\r\n\r\n" * 200
    session = run_session(text, b"HTTP/1.0 200 OK\r\n\r\nhello", engines=False)
    report = _decode(tmp_path, session, keylog=False)
    conn = report.connections[0]
    assert conn.status == "plain" and conn.syn_eno is None and "no ENO" in conn.reason
    assert conn.problems == []
    client, server = conn.directions
    assert client.framing == "raw" and client.could_be_plaintext and client.printable_ratio == 1.0
    assert client.plaintext_sha256 == _sha(text) and client.plaintext_complete


def test_fallback_when_the_server_has_no_engine(tmp_path):
    session = run_session(b"x" * 3000, b"y", b_engine=False)
    conn = _decode(tmp_path, session, keylog=False).connections[0]
    assert conn.syn_eno is not None and conn.synack_eno is None
    assert conn.status == "plain" and "SYN-ACK carries no ENO" in conn.reason
    assert conn.directions[0].plaintext_sha256 == _sha(b"x" * 3000)


# ---------------------------------------------------------------------------- rekey and resumption


def _one_frame_per_packet(wire, src):
    for i in data_packets(wire, src)[1:]:
        payload = parse_segment(wire[i]).payload
        assert 3 + struct.unpack_from("!H", payload, 1)[0] == len(payload)


def test_rekeyed_direction(tmp_path, fresh):
    """A's frames from the 10th on re-sealed under key generation 1, the first with the rekey bit."""
    _one_frame_per_packet(fresh.wire, A_IP)
    segs = [parse_segment(p) for p in fresh.wire]
    syn, synack = segs[0], segs[1]
    eno = {s.src: next(raw for kind, raw in parse_options(s.options) if kind == 69) for s in (syn, synack)}
    a_idx, b_idx = data_packets(fresh.wire, A_IP), data_packets(fresh.wire, B_IP)
    init1, init2 = segs[a_idx[0]].payload, segs[b_idx[0]].payload
    n_a = init1[11:43]
    es = bytes.fromhex(next(line.split()[2] for line in fresh.keylog if line.split()[1] == n_a.hex()))
    ss = session_secret(n_a, eno[A_IP] + eno[B_IP], init1, init2, es)
    aead = Aead.AES_128_GCM
    schedule = KeySchedule(ss, b"", 0x23, traffic_key_len(aead))
    old, new = FrameCipher(aead, schedule.keys(0).k_ab), FrameCipher(aead, schedule.keys(1).k_ab)
    packets = list(fresh.wire)
    rekey_at = None
    for n, i in enumerate(a_idx[10:]):
        offset = stream_offset(packets, i)
        plaintext = old.open(offset, segs[i].payload)
        packets[i] = with_payload(packets[i], new.seal(offset, plaintext, rekey=n == 0))
        rekey_at = offset if n == 0 else rekey_at
    report = _decode(tmp_path, fresh, packets)
    _check_fresh_decrypted(report, fresh)
    assert report.connections[0].directions[0].rekeys == [rekey_at]
    assert report.connections[0].directions[1].rekeys == []


def _resumed_capture(original_a: str, aead: Aead):
    """A resumed session built by hand from the core primitives (RFC 8548 §3.5), client = 10.77.0.1."""
    ss0 = hashlib.sha256(b"original session").digest()
    ss1 = next_session_secret(ss0)
    rid = resume_identifier(ss1)
    nonce_client, nonce_server = b"\x01" * 8, b"\x02" * 8
    half = {"client": rid[:9], "server": rid[9:]} if original_a == "client" else {"client": rid[9:], "server": rid[:9]}
    syn_eno = serialize_eno(EnoOption(None, (TepSuboption(0x23, half["client"] + nonce_client, True),)))
    synack_eno = serialize_eno(EnoOption(0x01, (TepSuboption(0x23, half["server"] + nonce_server, True),)))
    sn = nonce_client + nonce_server if original_a == "client" else nonce_server + nonce_client
    schedule = KeySchedule(ss1, sn, 0xA3, traffic_key_len(aead))
    keys = schedule.keys(0)
    send_key = {"client": keys.k_ab, "server": keys.k_ba} if original_a == "client" else \
        {"client": keys.k_ba, "server": keys.k_ab}
    isn = {"client": 1000, "server": 5_000_000}
    ip = {"client": (A_IP, 40001, B_IP, 80), "server": (B_IP, 80, A_IP, 40001)}
    data = {"client": os.urandom(5000), "server": b"resumed reply"}

    def pkt(side, seq, ack, flags, options=b"", payload=b""):
        src, sport, dst, dport = ip[side]
        opts = options + bytes(-len(options) % 4)
        return serialize_segment(new_segment(src, dst, sport, dport, seq, ack, flags, 1000, opts, payload))

    wire = [pkt("client", isn["client"], 0, TCP_SYN, syn_eno),
            pkt("server", isn["server"], isn["client"] + 1, TCP_SYN | TCP_ACK, synack_eno),
            pkt("client", isn["client"] + 1, isn["server"] + 1, TCP_ACK, NON_SYN_ENO)]
    offsets = {"client": 0, "server": 0}
    for side in ("client", "server"):
        cipher = FrameCipher(aead, send_key[side])
        body = data[side]
        chunks = [body[i : i + 1000] for i in range(0, len(body), 1000)]
        for n, chunk in enumerate(chunks):
            last = n == len(chunks) - 1
            frame = cipher.seal(offsets[side], bytes((1 if last else 0,)) + chunk)
            other = "server" if side == "client" else "client"
            wire.append(pkt(side, isn[side] + 1 + offsets[side], isn[other] + 1,
                            TCP_ACK | TCP_PSH | (TCP_FIN if last else 0), payload=frame))
            offsets[side] += len(frame)
    log = f"SS {rid.hex()} {ss1.hex()}"
    return wire, log, schedule.session_id.hex(), data, (nonce_client, nonce_server), rid


@pytest.mark.parametrize("original_a", ["client", "server"])
def test_resumed_session(tmp_path, original_a):
    wire, log, session_id, data, (n_client, n_server), rid = _resumed_capture(original_a, Aead.CHACHA20_POLY1305)
    keys = tmp_path / "keys"
    keys.write_text(log + "\n")
    report = decode_pcap(write_pcap(tmp_path / "r.pcap", wire), str(keys))
    conn = report.connections[0]
    assert conn.status == "encrypted" and conn.resumed and conn.tep_byte == 0xA3
    assert conn.init1 is None and conn.init2 is None
    assert conn.resume_id == rid.hex() and conn.original_a == original_a
    nonce_a, nonce_b = (n_client, n_server) if original_a == "client" else (n_server, n_client)
    assert (conn.nonce_a, conn.nonce_b) == (nonce_a.hex(), nonce_b.hex())
    assert conn.aead_name == "chacha20poly1305" and conn.session_id == session_id
    assert conn.problems == []
    client, server = conn.directions
    assert client.framing == "frames" and client.plaintext_sha256 == _sha(data["client"])
    assert server.plaintext_sha256 == _sha(data["server"]) and server.plaintext_complete
    # without the SS line, the chain of the original ES-derived secret is not there either
    report = decode_pcap(write_pcap(tmp_path / "r.pcap", wire))
    conn = report.connections[0]
    assert conn.resumed and conn.session_id is None and conn.directions[0].framing_valid
    assert conn.syn_eno.suboptions[0].resume_half is not None
