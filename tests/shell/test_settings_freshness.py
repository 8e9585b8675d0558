"""No-root tests: `run` settings (CLI, TOML file, precedence, errors), the cache-flush detectors, the
injector's two marks, and the control commands of the cache."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from nfq_tcpcrypt.__main__ import build_parser
from nfq_tcpcrypt.core.config import PolicyRule
from nfq_tcpcrypt.core.constants import Aead, Tep
from nfq_tcpcrypt.core.errors import ConfigError
from nfq_tcpcrypt.core.flow import Direction
from nfq_tcpcrypt.shell.daemon import control_commands
from nfq_tcpcrypt.shell.freshness import ClockJumpWatch, Freshness, VmGenWatch, is_new_vmgenid
from nfq_tcpcrypt.shell.inject import Injector
from nfq_tcpcrypt.shell.settings import cli_values, load_file, options_from, parse_file_text

VMGENID_UEVENT = (
    b"change@/devices/LNXSYSTM:00/LNXSYBUS:00/QEMUVGID:00\x00ACTION=change\x00"
    b"DEVPATH=/devices/LNXSYSTM:00/LNXSYBUS:00/QEMUVGID:00\x00SUBSYSTEM=acpi\x00"
    b"NEW_VMGENID=1\x00SEQNUM=4242\x00"
)
OTHER_UEVENT = (
    b"add@/devices/virtual/net/veth0\x00ACTION=add\x00SUBSYSTEM=net\x00INTERFACE=veth0\x00SEQNUM=7\x00"
)


def _options(argv: list[str], file_text: str | None = None):  # type: ignore[no-untyped-def]
    args = build_parser().parse_args(["run", *argv])
    file_values = parse_file_text(file_text) if file_text is not None else {}
    return options_from(file_values, cli_values(args))


class TestSettings:
    def test_defaults(self) -> None:
        options = _options([])
        assert (options.queue_num, options.mark, options.local_mark) == (7100, 0x7463, 0x7464)
        config = options.configuration()
        assert config.teps == (Tep.X25519,) and config.aeads == (Aead.AES_128_GCM,)
        assert config.resume and config.resume_nonce_len == 8 and config.rekey_bytes == 0

    def test_command_line(self) -> None:
        options = _options(
            ["--tep", "p256,x448", "--aead", "chacha20poly1305", "--rekey-bytes", "65536", "--keepalive", "30",
             "--no-resume", "--resume-nonce-len", "0", "--resume-ttl", "60"]
        )  # fmt: skip
        config = options.configuration()
        assert config.teps == (Tep.P256, Tep.X448) and config.aeads == (Aead.CHACHA20_POLY1305,)
        assert config.rekey_bytes == 65536 and config.keepalive == 30.0
        assert config.resume is False and config.resume_nonce_len == 0 and config.resume_ttl == 60.0

    def test_file_with_dashes_underscores_and_policies(self) -> None:
        text = """
            tep = ["x448", "x25519"]
            aeads = "aes256gcm"
            rekey-bytes = 1048576
            resume_ttl = 600
            queue-num = 7300
            mark = 0x100
            ipv6 = true

            [[policy]]
            network = "10.0.0.0/8"
            no-resume = true

            [[policy]]
            port = 443
            no_cache = true
        """
        options = _options([], text)
        config = options.configuration()
        assert config.teps == (Tep.X448, Tep.X25519) and config.aeads == (Aead.AES_256_GCM,)
        assert config.rekey_bytes == 1 << 20 and config.resume_ttl == 600.0
        assert (options.queue_num, options.mark, options.ipv6) == (7300, 0x100, True)
        assert config.policies == (
            PolicyRule(network="10.0.0.0/8", no_resume=True),
            PolicyRule(port=443, no_cache=True),
        )
        assert config.flags_for(bytes([10, 1, 2, 3]), 5555, 80) == (True, False)
        assert config.flags_for(bytes([192, 168, 1, 1]), 5555, 443) == (False, True)

    def test_command_line_wins_over_file(self) -> None:
        text = 'tep = "x448"\nrekey-bytes = 100\nresume = false\nfail-closed = true\n'
        options = _options(["--tep", "p521", "--resume"], text)
        config = options.configuration()
        assert config.teps == (Tep.P521,) and config.rekey_bytes == 100 and config.resume is True
        assert options.fail_closed is True

    @pytest.mark.parametrize(
        ("text", "message"),
        [
            ("rekey_byte = 5\n", "unknown key 'rekey_byte'"),
            ('rekey-bytes = "lots"\n', "rekey_bytes must be int"),
            ("resume = 1\n", "resume must be bool"),
            ("resume-nonce-len = 9\n", "outside 0..8"),
            ('tep = "x25519,rot13"\n', "unknown tep"),
            ('[[policy]]\nnetwork = "10.0.0.0/33"\n', "network"),
            ("[[policy]]\nport = 70000\n", "outside 1..65535"),
            ('[[policy]]\nhost = "x"\n', "unknown key 'host'"),
            ("policy = 3\n", "array of tables"),
            ("keepalive = -1\n", "must not be negative"),
            ("local-mark = 0x7463\n", "must differ"),
            ("= broken\n", "not valid TOML"),
        ],
    )
    def test_errors_are_clear(self, text: str, message: str) -> None:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
            _options([], text)

    def test_load_file(self, tmp_path: Path) -> None:
        path = tmp_path / "c.toml"
        path.write_text("keepalive = 5\n")
        assert load_file(str(path)) == {"keepalive": 5.0}
        with pytest.raises(ConfigError, match="cannot read"):
            load_file(str(tmp_path / "missing.toml"))


class TestVmGenId:
    def test_parse(self) -> None:
        assert is_new_vmgenid(VMGENID_UEVENT)
        assert not is_new_vmgenid(OTHER_UEVENT)
        assert not is_new_vmgenid(VMGENID_UEVENT.replace(b"NEW_VMGENID=1", b"NEW_VMGENID=0"))
        assert not is_new_vmgenid(b"")
        assert not is_new_vmgenid(b"\xff\xfe\x00=\x00")

    def test_fake_uevent_flushes(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        flushed: list[str] = []
        freshness = Freshness(flushed.append, vmgen=VmGenWatch(ours))
        try:
            theirs.send(OTHER_UEVENT)
            freshness.uevent_readable()
            assert flushed == []
            theirs.send(OTHER_UEVENT)
            theirs.send(VMGENID_UEVENT)
            freshness.uevent_readable()
            assert len(flushed) == 1 and "VM generation" in flushed[0]
            assert freshness.counters["cache_flush_vmgenid"] == 1
            assert freshness.vmgen is not None and freshness.vmgen.messages == 3
            freshness.uevent_readable()  # nothing waiting: no flush, no blocking
            assert len(flushed) == 1
        finally:
            freshness.close()
            theirs.close()


class TestClockJump:
    def test_suspend_is_detected_once(self) -> None:
        clock = {"boot": 1000.0, "mono": 900.0}
        watch = ClockJumpWatch(2.0, boottime=lambda: clock["boot"], monotonic=lambda: clock["mono"])
        flushed: list[str] = []
        freshness = Freshness(flushed.append, clock=watch)
        for _ in range(5):  # both clocks advance together while awake
            clock["boot"] += 10.0
            clock["mono"] += 10.0
            freshness.check_clock()
        clock["boot"] += 1.5  # NTP-sized drift and short pauses stay under the bound
        freshness.check_clock()
        assert flushed == []
        clock["boot"] += 3600.0 + 5.0  # an hour asleep, then 5 s awake
        clock["mono"] += 5.0
        freshness.check_clock()
        assert len(flushed) == 1 and "3600.0s" in flushed[0]
        freshness.check_clock()
        assert len(flushed) == 1
        assert freshness.counters["cache_flush_suspend"] == 1

    def test_real_clocks_do_not_fire(self) -> None:
        assert ClockJumpWatch().check() is None
        assert ClockJumpWatch().check(time.clock_gettime(time.CLOCK_MONOTONIC)) is None

    def test_the_loop_s_monotonic_reading_is_used_with_the_real_clocks_only(self) -> None:
        # the loop hands its `now` in: a reading 5 s old makes the gap 5 s larger, as a suspend would
        watch = ClockJumpWatch(2.0)
        slept = watch.check(time.clock_gettime(time.CLOCK_MONOTONIC) - 5.0)
        assert slept is not None and 5.0 <= slept < 7.0
        assert watch.check() is None  # back to the real gap: nothing slept
        # a test's clocks are read themselves, whatever the caller passes
        clock = {"boot": 1000.0, "mono": 900.0}
        fake = ClockJumpWatch(2.0, boottime=lambda: clock["boot"], monotonic=lambda: clock["mono"])
        assert fake.check(-1e9) is None
        clock["boot"] += 10.0
        assert fake.check(clock["mono"]) == 10.0


class _FakeEngine:
    def __init__(self) -> None:
        self.flushes: list[tuple[str, bytes | None]] = []

    def cache_info(self, now: float) -> list[dict[str, object]]:
        return [{"peer": "10.77.0.2", "tep": "x25519", "next_index": 2}]

    def flush_cache(self, reason: str, peer: bytes | None = None) -> int:
        self.flushes.append((reason, peer))
        return 3

    def session_table(self) -> list[dict[str, object]]:
        return []


def test_cache_control_commands() -> None:
    from nfq_tcpcrypt.shell.control import CommandError

    engine = _FakeEngine()
    commands = control_commands(engine, loop=None)  # type: ignore[arg-type]
    assert commands["cache"]({"cmd": "cache"}) == engine.cache_info(0)
    assert commands["cache_flush"]({"cmd": "cache_flush"}) == {"flushed": 3}
    assert commands["cache_flush"]({"cmd": "cache_flush", "peer": "10.77.0.2"}) == {"flushed": 3}
    assert engine.flushes[0][1] is None and engine.flushes[1][1] == bytes([10, 77, 0, 2])
    with pytest.raises(CommandError, match="not an IP"):
        commands["cache_flush"]({"cmd": "cache_flush", "peer": "nonsense"})


def test_injector_marks_by_direction() -> None:
    injector = Injector.__new__(Injector)  # no raw socket without root: only the mark choice
    injector.mark, injector.local_mark = 0x7463, 0x7464
    assert injector.mark_for(Direction.OUTBOUND) == 0x7463
    assert injector.mark_for(Direction.INBOUND) == 0x7464


def test_require_and_exclude_from_file_and_command_line() -> None:
    """Policy `require` / `exclude` per network and port; the command line's rules come first."""

    text = '[[policy]]\nnetwork = "192.0.2.0/24"\nrequire = true\n[[policy]]\nport = 22\nexclude = true\n'
    args = build_parser().parse_args(["run", "--exclude", "192.0.2.7/32", "--require", "@443",
                                      "--require", "2001:db8::/32@8443"])
    options = options_from(parse_file_text(text), cli_values(args))
    config = options.configuration()
    assert config.policies[:3] == (
        PolicyRule(port=443, require=True),  # the --require rules first, then the --exclude ones
        PolicyRule(network="2001:db8::/32", port=8443, require=True),
        PolicyRule(network="192.0.2.7/32", exclude=True),
    )
    peer, other = bytes([192, 0, 2, 9]), bytes([198, 51, 100, 1])
    assert config.policy_action(peer, 40000, 80) == "require"
    assert config.policy_action(bytes([192, 0, 2, 7]), 40000, 80) == "exclude"
    assert config.policy_action(other, 40000, 22) == "exclude"
    assert config.policy_action(other, 40000, 443) == "require"
    assert config.policy_action(other, 40000, 80) is None
    for bad in ("@http", "", "@"):
        with pytest.raises(ConfigError):
            cli_values(build_parser().parse_args(["run", "--require", bad]))
    with pytest.raises(ConfigError, match="both require and exclude"):
        parse_file_text("[[policy]]\nport = 1\nrequire = true\nexclude = true\n")


def test_marks_must_leave_the_encrypted_bit_alone() -> None:
    with pytest.raises(ConfigError, match="0x40000000"):
        _options(["--mark", str(0x40000001)])
