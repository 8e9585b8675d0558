"""iptables rules of the daemon: render, install, remove exactly, check for leftovers (DESIGN.md §5).

The templates live in `iptables/` at the top of the source tree (`host.rules` for IPv4, `host6.rules`
for IPv6; `gateway.rules` and `gateway6.rules` in gateway mode, where a line naming `$outside` is
repeated once per outside interface). They are applied with `iptables-restore --noflush`, so
nothing else in the tables is touched. Removal is derived from the rendered text itself: every rule
added to a built-in chain is deleted with the same specification, then every chain the template
declared is flushed and deleted.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import string
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

CHAIN_PREFIX = "NFQ_TCPCRYPT_"
"""Every chain the daemon creates starts with this name (DESIGN.md §5)."""

ENCRYPTED_MARK = 0x40000000
"""Packet-mark bit of packets of connections that negotiated encryption (README: Security model).
The daemon sets it in the verdicts of such packets; the rules save it in conntrack's mark, restore
it on the way out, and while no daemon runs drop those packets instead of letting them pass."""

TEMPLATES = {"ipv4": "host.rules", "ipv6": "host6.rules"}
GATEWAY_TEMPLATES = {"ipv4": "gateway.rules", "ipv6": "gateway6.rules"}
MODES = ("host", "gateway")
IFNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@-]{0,14}\+?")
"""An interface name iptables accepts in `-i`/`-o` (at most 15 characters; a final `+` is a prefix
match). Nothing else may reach the rule text."""
RESTORE = {"ipv4": "iptables-restore", "ipv6": "ip6tables-restore"}
SAVE = {"ipv4": "iptables-save", "ipv6": "ip6tables-save"}
_COMMAND_TIMEOUT = 30.0


class RulesError(RuntimeError):
    """Installing or removing the rules failed; the message carries the tool's stderr."""


def templates_dir() -> Path:
    """The directory of the rule templates: $NFQ_TCPCRYPT_RULES_DIR, else `iptables/` in the tree."""
    override = os.environ.get("NFQ_TCPCRYPT_RULES_DIR")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[2] / "iptables"


@dataclass(frozen=True)
class RuleParams:
    """The values substituted into a template."""

    inbound_queue: int
    outbound_queue: int
    mark: int
    fail_closed: bool = False
    local_mark: int | None = None
    """Mark of packets injected toward our own stack (tracked); None: `mark + 1`."""
    mode: str = "host"
    """"host" or "gateway" (the template pair)."""
    outside: tuple[str, ...] = ()
    """Gateway mode: the outside interfaces (where the wire is)."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise RulesError(f"unknown mode {self.mode!r}; known: {', '.join(MODES)}")
        if self.mode == "gateway" and not self.outside:
            raise RulesError("gateway mode needs at least one outside interface")
        for name in self.outside:
            if not valid_ifname(name):
                raise RulesError(f"{name!r} is not an interface name")

    def mapping(self) -> dict[str, str]:
        """Template placeholders -> text."""
        local_mark = self.mark + 1 if self.local_mark is None else self.local_mark
        return {
            "suffix": str(self.inbound_queue),
            "inbound_queue": str(self.inbound_queue),
            "outbound_queue": str(self.outbound_queue),
            "mark": f"{self.mark:#x}",
            "local_mark": f"{local_mark:#x}",
            "bypass": "" if self.fail_closed else "--queue-bypass",
            "enc_mark": f"{ENCRYPTED_MARK:#x}",
        }


def valid_ifname(name: str) -> bool:
    """Whether `name` is a well-formed interface name (or `prefix+` pattern) for `-i`/`-o`."""
    return IFNAME.fullmatch(name) is not None


def render(family: str, params: RuleParams) -> str:
    """The iptables-restore input for `family` ("ipv4" or "ipv6"), comments stripped."""
    templates = GATEWAY_TEMPLATES if params.mode == "gateway" else TEMPLATES
    text = (templates_dir() / templates[family]).read_text()
    lines: list[str] = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if "$outside" in line:
            lines.extend(line.replace("$outside", name) for name in params.outside)
        else:
            lines.append(line)
    rendered = string.Template("\n".join(lines)).substitute(params.mapping())
    return "\n".join(" ".join(line.split()) for line in rendered.splitlines()) + "\n"


def removal_text(installed: str) -> str:
    """The iptables-restore input that undoes `installed` exactly (delete jumps, then chains)."""
    out: list[str] = []
    table_rules: list[str] = []
    chains: list[str] = []
    for line in installed.splitlines():
        words = line.split()
        if not words:
            continue
        if line.startswith("*"):
            out.append(line)
            table_rules, chains = [], []
        elif line.startswith(":"):
            chains.append(words[0][1:])
        elif words[0] in ("-A", "-I") and not words[1].startswith(CHAIN_PREFIX):
            spec = words[2:]
            if words[0] == "-I" and spec and spec[0].isdigit():
                spec = spec[1:]
            table_rules.append(" ".join(["-D", words[1], *spec]))
        elif words[0] == "COMMIT":
            out.extend(table_rules)
            out.extend(f"-F {chain}" for chain in chains)
            out.extend(f"-X {chain}" for chain in chains)
            out.append("COMMIT")
    return "\n".join(out) + "\n"


def without_present_jumps(text: str, present: list[str]) -> str:
    """`text` without the jumps from built-in chains that `present` (iptables-save lines) already
    has; declaring our chains again flushes them, so the rest refills them in place."""
    have = {" ".join(line.split()) for line in present}
    out = []
    for line in text.splitlines():
        words = line.split()
        if words[:1] in (["-A"], ["-I"]) and not words[1].startswith(CHAIN_PREFIX):
            spec = words[2:]
            if words[0] == "-I" and spec and spec[0].isdigit():
                spec = spec[1:]
            if " ".join(["-A", words[1], *spec]) in have:
                continue
        out.append(line)
    return "\n".join(out) + "\n"


def _restore(family: str, text: str) -> None:
    result = subprocess.run(
        [RESTORE[family], "--noflush"],
        input=text,
        capture_output=True,
        text=True,
        timeout=_COMMAND_TIMEOUT,
        check=False,
    )
    if result.returncode != 0:
        raise RulesError(f"{RESTORE[family]} failed ({result.returncode}): {result.stderr.strip()}")


@dataclass
class InstalledRules:
    """The rules this process installed, per family; `remove()` undoes exactly them."""

    texts: dict[str, str] = field(default_factory=dict)

    def remove(self) -> list[str]:
        """Remove every installed rule and chain; return the problems met (empty when clean)."""
        problems: list[str] = []
        for family, text in list(self.texts.items()):
            try:
                _restore(family, removal_text(text))
            except (RulesError, OSError, subprocess.TimeoutExpired) as exc:
                problems.extend(_remove_one_by_one(family, text, exc))
            del self.texts[family]
        for problem in problems:
            logger.error("rule removal: %s", problem)
        return problems


def _remove_one_by_one(family: str, text: str, first_error: BaseException) -> list[str]:
    """Fallback when the atomic removal fails: try each deletion alone, report what failed."""
    logger.warning("atomic %s rule removal failed (%s); removing one by one", family, first_error)
    command = RESTORE[family].replace("-restore", "")
    problems = []
    table = "filter"
    for line in removal_text(text).splitlines():
        if line.startswith("*"):
            table = line[1:]
            continue
        if line == "COMMIT":
            continue
        argv = [command, "-t", table, *line.split()]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=_COMMAND_TIMEOUT, check=False)
        if result.returncode != 0:
            problems.append(f"{' '.join(argv)}: {result.stderr.strip()}")
    return problems


def available(family: str) -> bool:
    """Whether the restore tool for `family` is installed."""
    return shutil.which(RESTORE[family]) is not None


def install(params: RuleParams, families: tuple[str, ...] = ("ipv4",)) -> InstalledRules:
    """Install the rules of `params.mode` for each family; on any failure remove what went in and raise."""
    installed = InstalledRules()
    try:
        for family in families:
            text = render(family, params)
            present = leftovers(family) if available(family) else []
            if any(f"{CHAIN_PREFIX}PRE_{params.inbound_queue}" in line for line in present):
                # A killed daemon's rules are still in (they keep encrypted connections from
                # leaving in plaintext): take them over in one transaction per table, never
                # leaving a moment without them (README: Security model).
                logger.info("%s: taking over the rules a killed daemon left", family)
                _restore(family, without_present_jumps(text, present))
            else:
                _restore(family, text)
            installed.texts[family] = text
            logger.info(
                "%s %s-mode rules installed%s (queues %d/%d, mark %#x, %s)",
                family,
                params.mode,
                f" (outside {','.join(params.outside)})" if params.outside else "",
                params.inbound_queue,
                params.outbound_queue,
                params.mark,
                "fail-closed" if params.fail_closed else "fail-open",
            )
    except BaseException:
        installed.remove()
        raise
    return installed


def remove_stale(queue_num: int, families: tuple[str, ...] = ("ipv4", "ipv6")) -> list[str]:
    """Remove the chains a killed daemon (queues `queue_num`/+1) left behind; return the problems.

    The removal is derived from the template exactly as on a normal exit; the jump rules do not
    depend on the mark, on fail-open/closed or on the mode (the gateway templates declare the same
    chains and jumps as the host ones), and the chains are flushed whole.
    """
    problems: list[str] = []
    for family in families:
        if not available(family) or not any(
            f"{CHAIN_PREFIX}PRE_{queue_num}" in line for line in leftovers(family)
        ):
            continue
        stale = InstalledRules({family: render(family, RuleParams(queue_num, queue_num + 1, 0))})
        problems.extend(stale.remove())
    return problems


def leftovers(family: str = "ipv4") -> list[str]:
    """Lines of `iptables-save` that mention NFQ_TCPCRYPT chains or NFQUEUE (empty when clean)."""
    result = subprocess.run(
        [SAVE[family]], capture_output=True, text=True, timeout=_COMMAND_TIMEOUT, check=True
    )
    return [line for line in result.stdout.splitlines() if CHAIN_PREFIX in line or "NFQUEUE" in line]
