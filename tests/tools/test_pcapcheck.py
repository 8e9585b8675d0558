"""tools/pcapcheck.analyze on a capture of two connections between the same hosts (a transfer cut
short, then a fresh connection), as the integration tests take them: each connection reassembled on
its own, leaks counted in both."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from nfq_tcpcrypt.core.wire.tcp import new_segment, serialize_segment
from nfq_tcpcrypt.tools.pcapcheck import analyze
from tests.tools.captures import write_pcap

CLIENT, SERVER, PORT = "10.77.1.1", "10.77.2.2", 8080
SYN, ACK = 0x02, 0x10
C, S = ipaddress.ip_address(CLIENT).packed, ipaddress.ip_address(SERVER).packed


def _connection(cport: int, client_isn: int, server_isn: int, body: bytes) -> list[bytes]:
    """SYN, SYN-ACK, ACK, then `body` from the server in 1000-byte segments."""
    out = [
        new_segment(C, S, cport, PORT, client_isn, 0, SYN, 1000),
        new_segment(S, C, PORT, cport, server_isn, client_isn + 1, SYN | ACK, 1000),
        new_segment(C, S, cport, PORT, client_isn + 1, server_isn + 1, ACK, 1000),
    ]
    for offset in range(0, len(body), 1000):
        seq = (server_isn + 1 + offset) & 0xFFFFFFFF
        out.append(new_segment(S, C, PORT, cport, seq, client_isn + 1, ACK, 1000, b"", body[offset : offset + 1000]))
    return [serialize_segment(seg) for seg in out]


def test_two_connections_are_reassembled_apart(tmp_path: Path) -> None:
    # the first connection's sequence numbers lie 128 MiB past the second's ISN: placed against the
    # second's ISN they made a stream of that size, searched once per needle
    marker = b"PLAINTEXT-SPLIT-MARKER"
    first_body = b"x" * 990 + marker + b"y" * 988  # the marker spans two segments
    second_body = b"z" * 3000
    packets = _connection(40000, 1000, 0x08000000, first_body) + _connection(40001, 2000, 0x00000010, second_body)
    report = analyze(Path(write_pcap(tmp_path / "two.pcap", packets)), CLIENT, SERVER, PORT, {"marker": marker})
    assert report.server_stream == second_body  # the last connection's streams
    assert report.client_stream == b""
    assert report.leaks == {"marker": 1}  # found only in the first connection's reassembled stream
    assert report.packets == len(packets)
