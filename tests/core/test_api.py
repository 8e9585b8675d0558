"""The application API (RFC 8547 §5.1): a session ID for a keyed connection, an error otherwise."""

from __future__ import annotations

import pytest

from nfq_tcpcrypt.api import NoSessionId, endpoint, find_session
from nfq_tcpcrypt.lab.tcpmodel import Pair, seeded_config


def test_session_id_of_a_keyed_connection_and_errors_otherwise():
    pair = Pair(a_config=seeded_config(b"x", eno_app_aware=True), b_config=seeded_config(b"y"))
    pair.open()
    table_a, table_b = pair.engine_a.session_table(), pair.engine_b.session_table()
    a = find_session(table_a, "10.77.0.1:40000", "10.77.0.2:80")
    b = find_session(table_b, "10.77.0.2:80", "10.77.0.1:40000")
    assert a.session_id == b.session_id and len(a.session_id) == 33
    assert (a.role, b.role) == ("A", "B")
    assert b.peer_app_aware and not a.peer_app_aware  # A set a = 1, B did not
    with pytest.raises(NoSessionId):
        find_session(table_a, "10.77.0.1:40001", "10.77.0.2:80")
    plain = Pair(b_engine=False)
    plain.open()
    with pytest.raises(NoSessionId, match="no session ID"):
        find_session(plain.engine_a.session_table(), "10.77.0.1:40000", "10.77.0.2:80")


def test_endpoint_format():
    assert endpoint(("10.0.0.1", 80)) == "10.0.0.1:80"
    assert endpoint(("fd77::1", 80, 0, 0)) == "[fd77::1]:80"
    assert endpoint(("::ffff:10.0.0.1", 80, 0, 0)) == "10.0.0.1:80"
