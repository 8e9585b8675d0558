"""No-root tests of gateway mode's shell side: rule rendering and removal, `run` options, the checks
against the machine's interfaces (README, "Gateway mode")."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from nfq_tcpcrypt.__main__ import build_parser
from nfq_tcpcrypt.core.errors import ConfigError
from nfq_tcpcrypt.shell import rules
from nfq_tcpcrypt.shell.settings import (
    DaemonOptions,
    cli_values,
    inside_deliver_max,
    options_from,
    parse_file_text,
    resolve_system,
)


def _options(argv: list[str], file_text: str | None = None) -> DaemonOptions:
    args = build_parser().parse_args(["run", *argv])
    file_values = parse_file_text(file_text) if file_text is not None else {}
    return options_from(file_values, cli_values(args))


def _sys_net(tmp_path: Path, mtus: dict[str, int]) -> str:
    """A fake /sys/class/net with one `mtu` file per interface."""
    for name, mtu in mtus.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "mtu").write_text(f"{mtu}\n")
    return str(tmp_path)


class TestGatewayRules:
    params = rules.RuleParams(7100, 7101, 0x7463, mode="gateway", outside=("wan0", "wan1"))

    @pytest.mark.parametrize("family", ["ipv4", "ipv6"])
    def test_render(self, family: str) -> None:
        text = rules.render(family, self.params)
        assert "$" not in text and "#" not in text
        icmp = (
            "-p icmp --icmp-type fragmentation-needed"
            if family == "ipv4"
            else "-p ipv6-icmp --icmpv6-type packet-too-big"
        )
        icmp_out = (
            "-p icmp --icmp-type destination-unreachable"
            if family == "ipv4"
            else "-p ipv6-icmp --icmpv6-type destination-unreachable"
        )
        # Decrypt as in host mode; encrypt after source NAT: no iptables jump into POSTROUTING, an
        # nft base chain at srcnat + 10 jumps to the same user chain (README: NAT on the gateway).
        assert "-I PREROUTING 1 -j NFQ_TCPCRYPT_PRE_7100" in text
        assert "POSTROUTING" not in text and ":NFQ_TCPCRYPT_POST_7100 - [0:0]" in text
        nft = rules.render_nft(family, self.params)
        table = "ip" if family == "ipv4" else "ip6"
        assert nft.splitlines() == [
            f"add chain {table} mangle NFQ_TCPCRYPT_SNAT_7100 "
            "{ type filter hook postrouting priority srcnat + 10; policy accept; }",
            f"add rule {table} mangle NFQ_TCPCRYPT_SNAT_7100 jump NFQ_TCPCRYPT_POST_7100",
        ]
        assert rules.nft_removal_text(nft) == f"delete chain {table} mangle NFQ_TCPCRYPT_SNAT_7100\n"
        assert rules.render_nft(family, rules.RuleParams(7100, 7101, 0x7463)) == ""
        for name in ("wan0", "wan1"):
            assert f"-A NFQ_TCPCRYPT_PRE_7100 -i {name} -p tcp -j NFQ_TCPCRYPT_INQ_7100" in text
            assert f"-A NFQ_TCPCRYPT_PRE_7100 -i {name} {icmp} -j NFQ_TCPCRYPT_INQ_7100" in text
            assert f"-A NFQ_TCPCRYPT_POST_7100 -o {name} -p tcp -j NFQ_TCPCRYPT_OUTQ_7100" in text
            # our kernel's ICMP errors about decrypted packets go through the engine too (plaintext quotes)
            assert f"-A NFQ_TCPCRYPT_POST_7100 -o {name} {icmp_out} -j NFQ_TCPCRYPT_OUTQ_7100" in text
        assert "-A NFQ_TCPCRYPT_OUTQ_7100 -j NFQUEUE --queue-num 7101 --queue-bypass" in text
        assert f"-A NFQ_TCPCRYPT_PRE_7100 -i lo {icmp} -j NFQ_TCPCRYPT_INQ_7100" in text
        # SYNs toward the wire: MSS clamped to the outside route's MTU, then queued.
        clamp = "-A NFQ_TCPCRYPT_POST_7100 -o wan0 -p tcp --tcp-flags SYN,RST SYN -j TCPMSS --clamp-mss-to-pmtu"
        lines = text.splitlines()
        assert lines.index(clamp) < lines.index("-A NFQ_TCPCRYPT_POST_7100 -o wan0 -p tcp -j NFQ_TCPCRYPT_OUTQ_7100")
        # Every TCP rule names an outside interface: nothing else is queued.
        assert not any(" -p tcp" in line and " -i " not in line and " -o " not in line for line in text.splitlines())
        # Loopback and both marks are never queued; only the wire mark is notracked.
        assert "-A NFQ_TCPCRYPT_PRE_7100 -i lo -j RETURN" in text
        assert "-A NFQ_TCPCRYPT_POST_7100 -o lo -j RETURN" in text
        for mark in ("0x7463", "0x7464"):
            assert f"-A NFQ_TCPCRYPT_PRE_7100 -m mark --mark {mark} -j RETURN" in text
            assert f"-A NFQ_TCPCRYPT_POST_7100 -m mark --mark {mark} -j RETURN" in text
        assert "-A NFQ_TCPCRYPT_OUT_7100 -m mark --mark 0x7463 -j CT --notrack" in text
        assert "0x7464 -j CT --notrack" not in text
        lines = text.splitlines()
        assert lines.index("-A NFQ_TCPCRYPT_PRE_7100 -m mark --mark 0x7463 -j RETURN") < lines.index(
            "-A NFQ_TCPCRYPT_PRE_7100 -i wan0 -p tcp -j NFQ_TCPCRYPT_INQ_7100"
        )

    def test_fail_closed(self) -> None:
        closed = rules.RuleParams(7100, 7101, 0x7463, fail_closed=True, mode="gateway", outside=("wan0",))
        text = rules.render("ipv4", closed)
        assert "--queue-bypass" not in text and text.count("NFQUEUE") == 3

    @pytest.mark.parametrize("family", ["ipv4", "ipv6"])
    def test_removal_is_that_of_host_mode_but_the_postrouting_jump(self, family: str) -> None:
        """Same chains as host mode; the only jump host mode has and a gateway lacks is POSTROUTING's."""
        host = rules.RuleParams(7100, 7101, 0x7463)
        gateway_removal = rules.removal_text(rules.render(family, self.params)).splitlines()
        host_removal = rules.removal_text(rules.render(family, host)).splitlines()
        assert [line for line in host_removal if "POSTROUTING" not in line] == gateway_removal

    @pytest.mark.parametrize("name", ["-j", "eth0 -j ACCEPT", "a" * 16, "", "+", "eth0\nCOMMIT", "x/y"])
    def test_bad_interface_names_never_reach_the_text(self, name: str) -> None:
        assert not rules.valid_ifname(name)
        with pytest.raises(rules.RulesError):
            rules.RuleParams(7100, 7101, 0x7463, mode="gateway", outside=(name,))

    @pytest.mark.parametrize("name", ["eth0", "wan+", "enp3s0f1", "veth-gaw", "br0.100", "a" * 15])
    def test_good_interface_names(self, name: str) -> None:
        assert rules.valid_ifname(name)

    def test_gateway_needs_outside_and_modes_are_known(self) -> None:
        with pytest.raises(rules.RulesError, match="outside"):
            rules.RuleParams(7100, 7101, 0x7463, mode="gateway")
        with pytest.raises(rules.RulesError, match="unknown mode"):
            rules.RuleParams(7100, 7101, 0x7463, mode="router")


class TestGatewaySettings:
    def test_command_line(self) -> None:
        options = _options(["--mode", "gateway", "--outside", "wan0, wan1", "--deliver-max", "1400"])
        assert options.mode == "gateway" and options.outside == ("wan0", "wan1")
        assert options.configuration().deliver_max == 1400

    def test_file(self) -> None:
        options = _options([], 'mode = "gateway"\noutside = ["wan0", "ppp+"]\ndeliver-max = 1200\n')
        assert options.mode == "gateway" and options.outside == ("wan0", "ppp+")
        assert options.configuration().deliver_max == 1200
        assert _options([], 'mode = "gateway"\noutside = "wan0,wan1"\n').outside == ("wan0", "wan1")

    def test_command_line_wins(self) -> None:
        options = _options(["--outside", "wan1"], 'mode = "gateway"\noutside = "wan0"\n')
        assert options.outside == ("wan1",)

    def test_host_mode_keeps_the_engine_default(self) -> None:
        assert _options([]).configuration().deliver_max == 32768

    @pytest.mark.parametrize(
        ("argv", "text", "message"),
        [
            (["--mode", "gateway"], None, "gateway mode needs --outside"),
            (["--outside", "wan0"], None, "for gateway mode only"),
            ([], 'mode = "router"\n', "unknown mode 'router'"),
            (["--mode", "gateway", "--outside", "wan0,-j"], None, "'-j' is not an interface name"),
            (["--mode", "gateway", "--outside", "wan0,wan0"], None, "twice"),
            (["--mode", "gateway", "--outside", "wan0", "--deliver-max", "100"], None, "below 256"),
            ([], "outside = 3\n", "outside must be str"),
        ],
    )
    def test_errors_are_clear(self, argv: list[str], text: str | None, message: str) -> None:
        with pytest.raises(ConfigError, match=message):
            _options(argv, text)


class TestResolveSystem:
    def test_unknown_interface(self, tmp_path: Path) -> None:
        options = _options(["--mode", "gateway", "--outside", "wan9"])
        with pytest.raises(ConfigError, match="'wan9' does not exist here"):
            resolve_system(options, _sys_net(tmp_path, {"lo": 65536, "wan0": 1500, "lan0": 1500}))

    def test_prefix_must_match_one(self, tmp_path: Path) -> None:
        sys_net = _sys_net(tmp_path, {"lo": 65536, "ppp0": 1492, "lan0": 1500})
        resolve_system(_options(["--mode", "gateway", "--outside", "ppp+"]), sys_net)
        with pytest.raises(ConfigError, match="does not exist"):
            resolve_system(_options(["--mode", "gateway", "--outside", "wwan+"]), sys_net)

    def test_deliver_max_from_the_inside_mtu(self, tmp_path: Path) -> None:
        sys_net = _sys_net(tmp_path, {"lo": 65536, "wan0": 1500, "lan0": 1500, "lan1": 1400})
        options = _options(["--mode", "gateway", "--outside", "wan0"])
        resolve_system(options, sys_net)
        assert options.configuration().deliver_max == 1400 - 40 - 20
        options = _options(["--mode", "gateway", "--outside", "wan0", "--ipv6"])
        resolve_system(options, sys_net)
        assert options.configuration().deliver_max == 1400 - 60 - 20
        options = _options(["--mode", "gateway", "--outside", "wan0", "--deliver-max", "1000"])
        resolve_system(options, sys_net)
        assert options.configuration().deliver_max == 1000

    def test_host_mode_is_not_checked(self, tmp_path: Path) -> None:
        options = _options([])
        resolve_system(options, str(tmp_path / "nothing"))
        assert "deliver_max" not in options.engine

    def test_inside_deliver_max(self) -> None:
        mtus = {"lo": 65536, "wan0": 9000, "wan1": 1500, "lan0": 1500}
        assert inside_deliver_max(mtus, ("wan+",), ipv6=False) == 1440
        assert inside_deliver_max({"lo": 65536, "wan0": 1500}, ("wan0",), ipv6=False) is None
        assert inside_deliver_max({"lan0": 576}, ("wan0",), ipv6=False) == 516
        assert inside_deliver_max({"lan0": 300}, ("wan0",), ipv6=False) == 256


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--mode", "gateway"], "needs --outside"),
        (["--mode", "gateway", "--outside", "nfq-no-such0"], "'nfq-no-such0' does not exist"),
        (["--cpus", "4095"], "cpus: 4095 not available here"),
    ],
)
def test_cli_exit_status_2(argv: list[str], message: str) -> None:
    """`run` refuses a missing or unknown outside interface, or a CPU it may not run on, before
    touching anything (exit 2)."""
    result = subprocess.run(
        [sys.executable, "-m", "nfq_tcpcrypt", "run", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
