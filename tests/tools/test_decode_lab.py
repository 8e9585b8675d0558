"""`decode` on a real capture from the integration lab (root, netns, NFQUEUE; skipped otherwise)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from nfq_tcpcrypt.lab.net import HTTP_PORT, Topology, http_transfer
from nfq_tcpcrypt.tools.decode import decode_pcap, render_text
from tests.integration.conftest import lab_topology

pytestmark = pytest.mark.netns
SIZE = 2 * 1024 * 1024


@pytest.fixture
def lab_topo() -> Iterator[Topology]:
    yield from lab_topology("nfqdec")


def test_decode_real_lab_capture(lab_topo: Topology, tmp_path: Path) -> None:
    result = http_transfer(lab_topo, tmp_path, size=SIZE)
    assert result.pcap is not None and result.keylogs
    keylog = tmp_path / "all.keys"
    keylog.write_text("".join(result.keylogs.values()))
    report = decode_pcap(str(result.pcap), str(keylog), str(tmp_path / "plain"))
    print(render_text(report))
    conns = [c for c in report.connections if c.server.endswith(f":{HTTP_PORT}")]
    assert len(conns) == 1
    conn = conns[0]
    assert conn.status == "encrypted" and conn.handshake == "complete"
    session = result.session_for("a")
    assert session is not None and conn.session_id == session["session_id"]
    client, server = conn.directions
    assert client.framing_valid and server.framing_valid
    assert client.failed == server.failed == 0
    # the HTTP response body is the served file: its digest is the tail of the server's plaintext
    body = Path(server.plaintext_file).read_bytes()
    assert server.plaintext_complete
    assert hashlib.sha256(body[-SIZE:]).hexdigest() == result.sent_sha256
