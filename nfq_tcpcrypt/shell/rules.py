"""iptables rules of the daemon: render, install, remove exactly, check for leftovers (DESIGN.md §5).

The templates live in `iptables/` at the top of the source tree (`host.rules` for IPv4, `host6.rules`
for IPv6). They are applied with `iptables-restore --noflush`, so nothing else in the tables is
touched. Removal is derived from the rendered text itself: every rule added to a built-in chain is
deleted with the same specification, then every chain the template declared is flushed and deleted.
"""

from __future__ import annotations

import logging
import os
import shutil
import string
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

CHAIN_PREFIX = "NFQ_TCPCRYPT_"
"""Every chain the daemon creates starts with this name (DESIGN.md §5)."""

TEMPLATES = {"ipv4": "host.rules", "ipv6": "host6.rules"}
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
        }


def render(family: str, params: RuleParams) -> str:
    """The iptables-restore input for `family` ("ipv4" or "ipv6"), comments stripped."""
    text = (templates_dir() / TEMPLATES[family]).read_text()
    lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
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
    """Install the host-mode rules for each family; on any failure remove what went in and raise."""
    installed = InstalledRules()
    try:
        for family in families:
            text = render(family, params)
            _restore(family, text)
            installed.texts[family] = text
            logger.info(
                "%s rules installed (queues %d/%d, mark %#x, %s)",
                family,
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
    depend on the mark or on fail-open/closed, and the chains are flushed whole.
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
