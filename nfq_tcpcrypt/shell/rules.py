"""iptables rules of the daemon: render, install, remove exactly, check for leftovers (docs/architecture.md).

The templates live in `iptables/` at the top of the source tree, and an installed wheel carries
them as `nfq_tcpcrypt/iptables/`: `host.rules` for IPv4, `host6.rules` for IPv6; `gateway.rules` and
`gateway6.rules` in gateway mode, where a line naming `$outside` is repeated once per outside
interface. They are applied with `iptables-restore --noflush`, so nothing else in the tables is
touched. Removal is derived from the rendered text itself: every rule added to a built-in chain is
deleted with the same specification, then every chain the template declared is flushed and deleted.
Template lines starting with `@nft` are `nft -f` input, applied after the iptables part and removed
before it: the gateway's base chain after source NAT (README: NAT on the gateway).
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

from . import dispatch

logger = logging.getLogger(__name__)

CHAIN_PREFIX = "NFQ_TCPCRYPT_"
"""Every chain the daemon creates starts with this name (docs/architecture.md: Hooks, marks and conntrack)."""

ENCRYPTED_MARK = 0x40000000
"""Packet-mark bit of packets of connections that negotiated encryption (README: Security model).
The daemon sets it in the verdicts of such packets; the rules save it in conntrack's mark, restore
it on the way out, and while no daemon runs drop those packets instead of letting them pass."""

TEMPLATES = {"ipv4": "host.rules", "ipv6": "host6.rules"}
GATEWAY_TEMPLATES = {"ipv4": "gateway.rules", "ipv6": "gateway6.rules"}
MODES = ("host", "gateway")
MAX_WORKERS = 64
IFNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@-]{0,14}\+?")
"""An interface name iptables accepts in `-i`/`-o` (at most 15 characters; a final `+` is a prefix
match). Nothing else may reach the rule text."""
RESTORE = {"ipv4": "iptables-restore", "ipv6": "ip6tables-restore"}
SAVE = {"ipv4": "iptables-save", "ipv6": "ip6tables-save"}
NFT_FAMILY = {"ipv4": "ip", "ipv6": "ip6"}
NFT_PREFIX = "@nft "
"""A template line with this prefix is an `nft -f` command (rendered like the rest)."""
NFT_ADD_CHAIN = re.compile(r"add chain (ip6?) (\w+) (" + CHAIN_PREFIX + r"\w+) ")
_COMMAND_TIMEOUT = 30.0


class RulesError(RuntimeError):
    """Installing or removing the rules failed; the message carries the tool's stderr."""


def templates_dir() -> Path:
    """The directory of the rule templates: $NFQ_TCPCRYPT_RULES_DIR, else the package data of an
    installed wheel (`nfq_tcpcrypt/iptables/`), else `iptables/` at the top of a source tree."""
    override = os.environ.get("NFQ_TCPCRYPT_RULES_DIR")
    if override:
        return Path(override)
    package = Path(__file__).resolve().parents[1]
    installed = package / "iptables"
    if (installed / TEMPLATES["ipv4"]).is_file():
        return installed
    return package.parent / "iptables"


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
    workers: int = 1
    """Worker k has the queues inbound_queue + 2k and outbound_queue + 2k (dispatch.py chooses k)."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise RulesError(f"unknown mode {self.mode!r}; known: {', '.join(MODES)}")
        if self.mode == "gateway" and not self.outside:
            raise RulesError("gateway mode needs at least one outside interface")
        for name in self.outside:
            if not valid_ifname(name):
                raise RulesError(f"{name!r} is not an interface name")
        if not 1 <= self.workers <= MAX_WORKERS:
            raise RulesError(f"workers must be 1..{MAX_WORKERS}, not {self.workers}")

    def mapping(self) -> dict[str, str]:
        """Template placeholders -> text."""
        local_mark = self.mark + 1 if self.local_mark is None else self.local_mark
        per_worker = {}
        for k in range(self.workers):
            per_worker[f"inbound_queue_{k}"] = str(self.inbound_queue + 2 * k)
            per_worker[f"outbound_queue_{k}"] = str(self.outbound_queue + 2 * k)
        return {
            **per_worker,
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
    return _render(family, params, nft=False)


def render_nft(family: str, params: RuleParams) -> str:
    """The `nft -f` input of the template's `@nft` lines for `family`; "" when it has none."""
    return _render(family, params, nft=True)


def _render(family: str, params: RuleParams, nft: bool) -> str:
    templates = GATEWAY_TEMPLATES if params.mode == "gateway" else TEMPLATES
    text = (templates_dir() / templates[family]).read_text()
    lines: list[str] = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line.startswith(NFT_PREFIX) != nft:
            continue
        line = line.removeprefix(NFT_PREFIX)
        if "$outside" in line:
            lines.extend(line.replace("$outside", name) for name in params.outside)
        elif "-j NFQUEUE" in line and params.workers > 1:
            lines.extend(_per_worker(family, line, params.workers))
        else:
            lines.append(line)
    if not lines:
        return ""
    rendered = string.Template("\n".join(lines)).substitute(params.mapping())
    return "\n".join(" ".join(line.split()) for line in rendered.splitlines()) + "\n"


def _per_worker(family: str, line: str, workers: int) -> list[str]:
    """The NFQUEUE rule `line` once per worker: its queue number + 2k, chosen by the symmetric
    4-tuple hash (dispatch.py); the last worker's rule takes whatever is left."""
    out = []
    for k in range(workers):
        queued = re.sub(r"\$(inbound|outbound)_queue", rf"${{\1_queue_{k}}}", line)
        if k < workers - 1:
            match = f'-m bpf --bytecode "{dispatch.program(family, workers, k)}"'
            queued = queued.replace("-j NFQUEUE", f"{match} -j NFQUEUE")
        out.append(queued)
    return out


def nft_removal_text(installed: str) -> str:
    """The `nft -f` input that deletes the base chains `installed` added (with their rules)."""
    return "".join(
        f"delete chain {match.group(1)} {match.group(2)} {match.group(3)}\n"
        for line in installed.splitlines()
        if (match := NFT_ADD_CHAIN.match(line))
    )


def _nft(text: str) -> None:
    """`nft -f -` with `text`. Like every rule tool run here, in a session of its own: a signal to
    the daemon's process group (Ctrl-C in a terminal) must not stop it halfway through the rules."""
    if shutil.which("nft") is None:
        raise RulesError("the nft tool is missing (Debian package nftables); gateway mode needs it")
    result = subprocess.run(
        ["nft", "-f", "-"], input=text, capture_output=True, text=True, timeout=_COMMAND_TIMEOUT, check=False,
        start_new_session=True,
    )
    if result.returncode != 0:
        raise RulesError(f"nft failed ({result.returncode}): {result.stderr.strip()}")


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
        start_new_session=True,
    )
    if result.returncode != 0:
        raise RulesError(f"{RESTORE[family]} failed ({result.returncode}): {result.stderr.strip()}")


@dataclass
class InstalledRules:
    """The rules this process installed, per family; `remove()` undoes exactly them."""

    texts: dict[str, str] = field(default_factory=dict)
    nft: dict[str, str] = field(default_factory=dict)
    """Per family, the `nft -f` text installed after the iptables part (removed before it)."""

    def lines(self) -> list[str]:
        """The rules in place, one line each, prefixed with their family (for `status`)."""
        out = [f"{family}: {line}" for family, text in self.texts.items()
               for line in text.splitlines() if line.startswith(("-A", "-I"))]  # fmt: skip
        out += [f"{family}: nft {line}" for family, text in self.nft.items() for line in text.splitlines()]
        return out

    def keep(self, reason: str) -> list[str]:
        """Leave the rules in place because encrypted connections were not reset (`reason`): with
        them a killed daemon's connections fail closed (README: Fail-open or fail-closed), and so do
        these. Returns the problem, as `remove` does."""
        problem = (f"encrypted connections were not reset ({reason}): the rules stay in place so that none "
                   "of their bytes leaves in plaintext; the next start takes them over, "
                   "`nfq-tcpcrypt rules remove` removes them")  # fmt: skip
        logger.error("%s", problem)
        self.texts.clear()
        self.nft.clear()
        return [problem]

    def remove(self) -> list[str]:
        """Remove every installed rule and chain; return the problems met (empty when clean)."""
        problems: list[str] = []
        for family, text in list(self.nft.items()):
            try:
                _nft(nft_removal_text(text))
            except (RulesError, OSError, subprocess.TimeoutExpired) as exc:
                problems.append(f"{family} nft chain removal: {exc}")
            del self.nft[family]
        for family, text in list(self.texts.items()):
            try:
                _restore(family, removal_text(text))
            except (RulesError, OSError, subprocess.TimeoutExpired) as exc:
                problems.extend(_remove_one_by_one(family, text, exc))
            del self.texts[family]
        for problem in problems:
            logger.error("rule removal: %s", problem)
        if not problems:
            logger.info("rules removed")
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
        result = subprocess.run(argv, capture_output=True, text=True, timeout=_COMMAND_TIMEOUT, check=False,
                                start_new_session=True)
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
            nft_text = render_nft(family, params)
            if nft_text:
                _nft(nft_text)  # one transaction: all of it or nothing
                installed.nft[family] = nft_text
            logger.info(
                "%s %s-mode rules installed from %s%s (queues %d/%d%s, mark %#x, %s)",
                family,
                params.mode,
                templates_dir(),
                f" (outside {','.join(params.outside)})" if params.outside else "",
                params.inbound_queue,
                params.outbound_queue,
                f" + 2k for workers k < {params.workers}" if params.workers > 1 else "",
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
    depend on the mark or on fail-open/closed, and the chains are flushed whole. A gateway is
    recognised by its nft base chain (it has no iptables jump into POSTROUTING).
    """
    problems: list[str] = []
    for family in families:
        if not available(family):
            continue
        gateway = f"{CHAIN_PREFIX}SNAT_{queue_num}" in nft_chains(family)
        if not gateway and not any(f"{CHAIN_PREFIX}PRE_{queue_num}" in line for line in leftovers(family)):
            continue
        params = RuleParams(queue_num, queue_num + 1, 0)
        if gateway:
            params = RuleParams(queue_num, queue_num + 1, 0, mode="gateway", outside=("lo",))
        nft = {family: render_nft(family, params)} if gateway else {}
        stale = InstalledRules({family: render(family, params)}, nft)
        problems.extend(stale.remove())
    return problems


def nft_chains(family: str = "ipv4") -> list[str]:
    """Names of the daemon's nft base chains in `family` (empty without the nft tool)."""
    if shutil.which("nft") is None:
        return []
    result = subprocess.run(
        ["nft", "list", "chains", NFT_FAMILY[family]],
        capture_output=True, text=True, timeout=_COMMAND_TIMEOUT, check=False,
    )  # fmt: skip
    chains = []
    for line in result.stdout.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "chain" and words[1].startswith(f"{CHAIN_PREFIX}SNAT_"):
            chains.append(words[1])
    return chains


def leftovers(family: str = "ipv4") -> list[str]:
    """Lines of `iptables-save` that mention NFQ_TCPCRYPT chains or NFQUEUE (empty when clean)."""
    result = subprocess.run(
        [SAVE[family]], capture_output=True, text=True, timeout=_COMMAND_TIMEOUT, check=True
    )
    return [line for line in result.stdout.splitlines() if CHAIN_PREFIX in line or "NFQUEUE" in line]
