"""ICMP fragmentation-needed toward our stack (docs/architecture.md, "Sizes"): MTU less the frame overhead,
quote in plain space."""

from __future__ import annotations

from nfq_tcpcrypt.core.flow import Direction
from nfq_tcpcrypt.core.verdict import Action
from nfq_tcpcrypt.core.wire.icmp import IcmpError, parse_icmp_error, serialize_icmp_error
from nfq_tcpcrypt.core.wire.ip import checksum_fold, new_ip_header
from nfq_tcpcrypt.core.wire.tcp import parse_segment, serialize_segment
from nfq_tcpcrypt.lab.tcpmodel import A_IP, B_IP, Pair


def _frag_needed(quoted: bytes, mtu: int, src: bytes = bytes([10, 77, 0, 254])) -> bytes:
    header = bytearray(new_ip_header(src, A_IP))
    header[9] = 1  # ICMP
    msg = IcmpError(bytes(header), src, A_IP, 3, 4, mtu, quoted[:28])
    return serialize_icmp_error(msg)


def test_frag_needed_is_translated():
    pair = Pair(seed=b"icmp")
    pair.open()
    pair.a.write(b"z" * 20000)
    pair.run()
    wire_data = [p for p in pair.wire if parse_segment(p).src == A_IP and parse_segment(p).payload]
    # The router reports the packet at snd_nxt (everything before it is acknowledged; a quote
    # outside snd_una..snd_nxt is dropped, as Linux does).
    last = parse_segment(wire_data[-1])
    last.seq = (last.seq + len(last.payload)) & 0xFFFFFFFF
    quoted = serialize_segment(last)
    icmp = _frag_needed(quoted, 1400)
    assert checksum_fold(icmp[20:]) == 0xFFFF  # a valid ICMP checksum
    verdict = pair.engine_a.process(icmp, Direction.INBOUND, pair.now)
    out = parse_icmp_error(verdict.packet)
    assert out.mtu == 1380
    wire_seq = parse_segment(quoted).seq
    _, _, _, _, _, plain_seq = out.quoted_tcp
    assert plain_seq != wire_seq
    assert checksum_fold(verdict.packet[20:]) == 0xFFFF
    # The quoted segment is acknowledged already: it maps to snd_una, which Linux still accepts
    # (tcp_v4_err: between(seq, snd_una, snd_nxt)).
    assert (plain_seq - pair.a.isn - 1) & 0xFFFFFFFF == pair.a.una == 20000
    # The model ignores ICMP and keeps sending 1440-byte segments; the engine now splits each
    # frame (1460 bytes) so that every wire packet fits the 1400-byte path.
    before = len(pair.wire)
    actions = []
    process = pair.engine_a.process

    def recording(packet, direction, now):
        verdict = process(packet, direction, now)
        if direction is Direction.OUTBOUND and len(parse_segment(packet).payload) > 1000:
            sent = verdict.packet or packet
            actions.append(Action.DROP if verdict.action is Action.DROP else len(parse_segment(sent).payload))
        return verdict

    pair.intercept[pair.engine_a] = recording
    pair.a.write(b"y" * 5000)
    pair.run()
    # Our stack now believes MTU 1380 (shared route cache), so data leaves through the injector.
    assert Action.DROP in actions and set(actions) <= {Action.DROP, 0}  # 0: an acked resend, now a probe
    # A later report from our own kernel about one of our wire packets is stale: dropped.
    assert process(_frag_needed(quoted, 1380, src=A_IP), Direction.INBOUND, pair.now).action is Action.DROP
    sizes = [len(parse_segment(p).payload) + len(parse_segment(p).options)
             for p in pair.wire[before:] if parse_segment(p).src == A_IP]
    assert sizes and max(sizes) <= 1400 - 20 - 20  # IP and TCP headers; options and payload within
    assert bytes(pair.b.received) == b"z" * 20000 + b"y" * 5000


def test_icmp_error_from_our_kernel_quotes_no_plaintext():
    # A gateway's kernel that cannot forward a decrypted packet to its inside host answers the
    # peer with ICMP host unreachable, quoting that packet: plaintext. Only the IP header and the
    # first 8 TCP bytes may leave, with the sequence number in wire space.
    pair = Pair(seed=b"icmp-out")
    pair.open()
    lost = []  # the decrypted packet B's "inside" never got (so it is not acknowledged either)
    receive = pair.b.receive

    def unreachable(packet):
        seg = parse_segment(packet)
        if not lost and b"secret plaintext" in seg.payload:
            lost.append(packet)
        if lost and seg.payload and seg.seq == parse_segment(lost[0]).seq:
            return  # and every copy handed over again
        receive(packet)

    pair.b.receive = unreachable
    pair.a.write(b"secret plaintext " * 200)
    pair.run(max_time=0.05)
    quoted = lost[0]
    header = bytearray(new_ip_header(B_IP, A_IP))
    header[9] = 1
    icmp = serialize_icmp_error(IcmpError(bytes(header), B_IP, A_IP, 3, 1, 0, quoted[:548]))
    verdict = pair.engine_b.process(icmp, Direction.OUTBOUND, pair.now)
    out = parse_icmp_error(verdict.packet)
    assert len(out.quote) == 28 and b"secret" not in verdict.packet
    wire_seqs = {parse_segment(p).seq for p in pair.wire if parse_segment(p).src == A_IP}
    assert out.quoted_tcp[5] in wire_seqs and out.quoted_tcp[5] != parse_segment(quoted).seq
