"""`decode` with the daemons' key logs as the proof that a capture is encrypted (README: decode)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from nfq_tcpcrypt.tools.decode import ConnectionReport, decode_pcap, render_text


def decoded_connections(pcap: Path, keylogs: Iterable[str], server_port: int) -> list[ConnectionReport]:
    """Every connection to `server_port` in `pcap`, decoded with the key logs joined; each one must
    be encrypted, with both directions verified frame by frame and none failing."""
    keylog = pcap.with_suffix(".keys")
    keylog.write_text("".join(keylogs))
    report = decode_pcap(str(pcap), str(keylog))
    text = render_text(report)
    conns = [conn for conn in report.connections if conn.server.endswith(f":{server_port}")]
    assert conns, text
    for conn in conns:
        assert conn.status == "encrypted" and conn.session_id, text
        assert len(conn.directions) == 2, text
        assert all(d.failed == 0 and d.verified > 0 for d in conn.directions), text
    return conns
