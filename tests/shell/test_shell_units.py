"""Shell pieces that need no root: rule rendering and exact removal, the control socket, the key log."""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path

import pytest

from nfq_tcpcrypt.shell import rules
from nfq_tcpcrypt.shell.control import ControlServer, query
from nfq_tcpcrypt.shell.keylog import HEADER, KeyLog, KeyLogError
from nfq_tcpcrypt.shell.nfq import ip_total_length


class TestRules:
    params = rules.RuleParams(inbound_queue=7100, outbound_queue=7101, mark=0x7463)

    @pytest.mark.parametrize("family", ["ipv4", "ipv6"])
    def test_render_host_mode(self, family: str) -> None:
        text = rules.render(family, self.params)
        assert "$" not in text and "#" not in text
        assert "-I PREROUTING 1 -j NFQ_TCPCRYPT_PRE_7100" in text
        assert "-I POSTROUTING 1 -j NFQ_TCPCRYPT_POST_7100" in text
        assert "-A NFQ_TCPCRYPT_PRE_7100 -i lo -j RETURN" in text
        assert "-A NFQ_TCPCRYPT_POST_7100 -o lo -j RETURN" in text
        assert "-A NFQ_TCPCRYPT_OUT_7100 -m mark --mark 0x7463 -j CT --notrack" in text
        assert "--queue-num 7100 --queue-bypass" in text
        assert "--queue-num 7101 --queue-bypass" in text
        # Packets injected toward our own stack skip both queues but are tracked.
        assert "-A NFQ_TCPCRYPT_PRE_7100 -m mark --mark 0x7464 -j RETURN" in text
        assert "-A NFQ_TCPCRYPT_POST_7100 -m mark --mark 0x7464 -j RETURN" in text
        assert "0x7464 -j CT --notrack" not in text
        # One NFQUEUE target per queue, plus the bypass-free one of encrypted connections; TCP and
        # the path-MTU ICMP type reach the inbound one.
        assert text.count("NFQUEUE") == 3
        icmp = (
            "-p icmp --icmp-type fragmentation-needed"
            if family == "ipv4"
            else "-p ipv6-icmp --icmpv6-type packet-too-big"
        )
        assert f"-A NFQ_TCPCRYPT_PRE_7100 {icmp} -j NFQ_TCPCRYPT_INQ_7100" in text
        assert "-A NFQ_TCPCRYPT_PRE_7100 -p tcp -j NFQ_TCPCRYPT_INQ_7100" in text
        assert "-A NFQ_TCPCRYPT_INQ_7100 -j NFQUEUE --queue-num 7100 --queue-bypass" in text

    def test_fail_closed_has_no_bypass(self) -> None:
        closed = rules.RuleParams(7100, 7101, 0x7463, fail_closed=True)
        text = rules.render("ipv4", closed)
        assert "--queue-bypass" not in text and text.count("NFQUEUE") == 3

    def test_removal_undoes_exactly_the_install(self) -> None:
        removal = rules.removal_text(rules.render("ipv4", self.params)).splitlines()
        assert removal == [
            "*raw",
            "-D PREROUTING -j NFQ_TCPCRYPT_PRE_7100",
            "-D OUTPUT -j NFQ_TCPCRYPT_OUT_7100",
            "-F NFQ_TCPCRYPT_PRE_7100",
            "-F NFQ_TCPCRYPT_INQ_7100",
            "-F NFQ_TCPCRYPT_OUT_7100",
            "-X NFQ_TCPCRYPT_PRE_7100",
            "-X NFQ_TCPCRYPT_INQ_7100",
            "-X NFQ_TCPCRYPT_OUT_7100",
            "COMMIT",
            "*mangle",
            "-D PREROUTING -j NFQ_TCPCRYPT_ENC_7100",
            "-D POSTROUTING -j NFQ_TCPCRYPT_POST_7100",
            "-F NFQ_TCPCRYPT_POST_7100",
            "-F NFQ_TCPCRYPT_OUTQ_7100",
            "-F NFQ_TCPCRYPT_ENC_7100",
            "-F NFQ_TCPCRYPT_ENCQ_7100",
            "-X NFQ_TCPCRYPT_POST_7100",
            "-X NFQ_TCPCRYPT_OUTQ_7100",
            "-X NFQ_TCPCRYPT_ENC_7100",
            "-X NFQ_TCPCRYPT_ENCQ_7100",
            "COMMIT",
        ]

    @pytest.mark.parametrize("mode", ["host", "gateway"])
    @pytest.mark.parametrize("family", ["ipv4", "ipv6"])
    def test_encrypted_connections_fail_closed(self, family: str, mode: str) -> None:
        """Conntrack remembers encrypted connections; their packets never bypass the queue."""
        params = rules.RuleParams(7100, 7101, 0x7463, mode=mode, outside=("wan0",) if mode == "gateway" else ())
        lines = rules.render(family, params).splitlines()
        enc = f"{rules.ENCRYPTED_MARK:#x}/{rules.ENCRYPTED_MARK:#x}"
        i_out, o_out = ("-i wan0 ", "-o wan0 ") if mode == "gateway" else ("", "")
        save = f"-A NFQ_TCPCRYPT_ENC_7100 {i_out}-p tcp -m mark --mark {enc} -j CONNMARK --set-xmark {enc}"
        drop = f"-A NFQ_TCPCRYPT_ENC_7100 {i_out}-p tcp -m connmark --mark {enc} -m mark ! --mark {enc} -j DROP"
        assert lines.index(save) < lines.index(drop)
        to_encq = f"-A NFQ_TCPCRYPT_POST_7100 {o_out}-p tcp -m connmark --mark {enc} -j NFQ_TCPCRYPT_ENCQ_7100"
        assert lines.index(to_encq) < lines.index(f"-A NFQ_TCPCRYPT_POST_7100 {o_out}-p tcp -j NFQ_TCPCRYPT_OUTQ_7100")
        assert f"-A NFQ_TCPCRYPT_ENCQ_7100 -j MARK --set-xmark {enc}" in lines
        assert "-A NFQ_TCPCRYPT_ENCQ_7100 -j NFQUEUE --queue-num 7101" in lines  # no --queue-bypass


def test_control_socket_answers_json(tmp_path: Path) -> None:
    path = str(tmp_path / "run" / "c.sock")
    table = [{"local": "10.77.0.1:1", "remote": "10.77.0.2:2", "session_id": "23" * 33}]
    server = ControlServer(
        path,
        {"sessions": lambda request: table, "echo": lambda request: {"peer": request.get("peer")}},
    )
    replies: dict[str, object] = {}

    def client() -> None:
        replies["sessions"] = query(path, "sessions")
        replies["bogus"] = query(path, "bogus")
        replies["echo"] = query(path, "echo", params={"peer": "10.77.0.2"})

    thread = threading.Thread(target=client)
    thread.start()
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        while thread.is_alive():
            conn = server.accept()
            for open_conn in list(server.clients):
                if server.readable(open_conn):
                    server.finish(open_conn)
            thread.join(0.01)
            del conn
    finally:
        thread.join(5)
        server.close()
    assert replies["sessions"] == table
    assert "unknown cmd" in json.dumps(replies["bogus"])
    assert replies["echo"] == {"peer": "10.77.0.2"}
    assert not os.path.exists(path)


def test_keylog_header_mode_and_flush(tmp_path: Path) -> None:
    path = tmp_path / "k.log"
    log = KeyLog(str(path))
    log.write("ES " + "00" * 32 + " " + "11" * 32)
    assert path.read_text() == HEADER + "ES " + "00" * 32 + " " + "11" * 32 + "\n"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    log.close()
    again = KeyLog(str(path))  # appending to an existing file writes no second header
    again.write("SS " + "22" * 18 + " " + "33" * 32 + "\n")
    again.close()
    assert path.read_text().count("#") == 1 and path.read_text().endswith("33" * 32 + "\n")


def test_keylog_refuses_unsafe_paths(tmp_path: Path) -> None:
    """O_NOFOLLOW, and only a regular file of ours with mode 0600 (README: Security model)."""
    target = tmp_path / "elsewhere"
    target.write_text("")
    os.chmod(target, 0o600)
    link = tmp_path / "link.log"
    link.symlink_to(target)
    fifo = tmp_path / "fifo.log"
    os.mkfifo(fifo, 0o600)
    loose = tmp_path / "loose.log"
    loose.write_text("")
    os.chmod(loose, 0o644)
    for path in (link, fifo, tmp_path, loose):
        with pytest.raises(KeyLogError):
            KeyLog(str(path))
    assert target.read_text() == "" and stat.S_IMODE(os.stat(loose).st_mode) == 0o644
    if os.geteuid() == 0:
        theirs = tmp_path / "theirs.log"
        theirs.write_text("")
        os.chmod(theirs, 0o600)
        os.chown(theirs, 65534, 65534)
        with pytest.raises(KeyLogError, match="owned by uid 65534"):
            KeyLog(str(theirs))
    old = os.umask(0o277)  # a new file is 0600 whatever the umask
    try:
        KeyLog(str(tmp_path / "new.log")).close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "new.log").st_mode) == 0o600


def test_ip_total_length() -> None:
    v4 = bytes([0x45, 0, 0x05, 0xDC]) + bytes(16)
    v6 = bytes([0x60, 0, 0, 0, 0x05, 0xB4]) + bytes(34)
    assert ip_total_length(v4) == 1500
    assert ip_total_length(v6) == 1500
    # a copy cut inside the length field reads what is there (and is then accepted as cut), as before
    assert ip_total_length(bytes([0x45, 0, 0x05])) == 5 and ip_total_length(bytes([0x45, 0])) == 0
    assert ip_total_length(bytes([0x60, 0, 0, 0, 0x05])) == 45
    assert ip_total_length(bytes([0x50]) + bytes(40)) == -1


def test_takeover_keeps_the_present_jumps_once() -> None:
    """A restarted daemon refills a killed one's chains without adding a second jump to them."""
    text = rules.render("ipv4", rules.RuleParams(7100, 7101, 0x7463))
    present = ["-A PREROUTING -j NFQ_TCPCRYPT_PRE_7100", "-A POSTROUTING -j NFQ_TCPCRYPT_POST_7100"]
    takeover = rules.without_present_jumps(text, present).splitlines()
    assert "-I PREROUTING 1 -j NFQ_TCPCRYPT_PRE_7100" not in takeover
    assert "-I POSTROUTING 1 -j NFQ_TCPCRYPT_POST_7100" not in takeover
    assert "-I OUTPUT 1 -j NFQ_TCPCRYPT_OUT_7100" in takeover  # missing: added
    assert "-I PREROUTING 1 -j NFQ_TCPCRYPT_ENC_7100" in takeover
    assert [line for line in text.splitlines() if line.startswith((":", "-A NFQ"))] == [
        line for line in takeover if line.startswith((":", "-A NFQ"))
    ]
