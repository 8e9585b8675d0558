"""`run` settings from the command line and a TOML file (README: Config file): one table of keys, one merge.

The file holds the same keys as the `run` options, spelled with dashes or underscores
(`rekey-bytes = 65536` or `rekey_bytes = 65536`), plus `[[policy]]` tables (`network`, `port`,
`no_resume`, `no_cache`). The command line wins over the file, the file over the defaults. Unknown
keys and values of the wrong type are errors that name the key, never silently ignored.

`cpus` pins the daemon to CPUs (a list such as "0,2-3" or a TOML array of numbers); `resolve_system`
checks that this process may run on them.

Gateway mode (`mode = "gateway"`) needs `outside` (one interface or several, comma-separated or a
TOML array). `resolve_system` then checks that they exist and, unless `deliver_max` is given, sets
it from the smallest MTU of the other (inside) interfaces.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..core.config import Configuration, PolicyRule, parse_aeads, parse_teps
from ..core.errors import ConfigError
from .rules import ENCRYPTED_MARK, MAX_WORKERS, MODES, valid_ifname

logger = logging.getLogger(__name__)

DEFAULT_QUEUE_NUM = 7100
DEFAULT_MARK = 0x7463
DEFAULT_LOCAL_MARK = 0x7464
DEFAULT_CONTROL = "/run/nfq-tcpcrypt/control.sock"
QUEUE_BACKENDS = ("netfilterqueue", "fast")
DELIVER_MAX_MIN = 256
"""The smallest `deliver_max` accepted (an inside MTU of 336 bytes; IPv4 guarantees 576)."""
SYS_NET = "/sys/class/net"


@dataclass
class DaemonOptions:
    """What `nfq-tcpcrypt run` was asked to do."""

    mode: str = "host"
    outside: tuple[str, ...] = ()
    """Gateway mode: the outside interfaces (the wire); every other interface is inside."""
    queue_num: int = DEFAULT_QUEUE_NUM
    mark: int = DEFAULT_MARK
    local_mark: int = DEFAULT_LOCAL_MARK
    control: str = DEFAULT_CONTROL
    keylog: str | None = None
    teps: str = "x25519"
    aeads: str = "aes128gcm"
    fail_closed: bool = False
    ipv6: bool = False
    pass_through: bool = False
    log_level: str | None = None
    workers: int | None = None
    """Worker processes (workers.py); None: 1 in host mode, one per CPU in gateway mode."""
    metrics_file: str | None = None
    """A Prometheus textfile the daemon rewrites (metrics.py)."""
    queue_backend: str = "fast"
    """The NFQUEUE binding (nfq.BACKENDS): NetfilterQueue, or our own netlink binding (fastqueue.py)."""
    queue_gso: bool | None = None
    """GSO super-packets from the queue (fast backend only); None: on with the fast backend."""
    cpus: tuple[int, ...] = ()
    """The CPUs the daemon runs on (README: CPU affinity): one process on all of them, or worker k on
    the k-th (round robin) and the supervisor on all; (): wherever the scheduler puts it."""
    queue_fail_open: bool = False
    """NFQA_CFG_F_FAIL_OPEN: a full queue accepts packets unqueued (fast backend, --pass-through only)."""
    config_file: str | None = None
    """The --config file, re-read on SIGHUP."""
    cli: dict[str, Any] = field(default_factory=dict)
    """The command-line values, applied again over the file on SIGHUP."""
    engine: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of `core.config.Configuration` beyond teps/aeads (rekey_bytes, resume, policies...)."""

    def configuration(self, secrets_log: Any = None) -> Configuration:
        """The engine configuration these options describe."""
        engine = {"gso_deliver": self.mode != "gateway", **self.engine}
        return Configuration(
            teps=parse_teps(self.teps), aeads=parse_aeads(self.aeads), secrets_log=secrets_log, **engine
        )


# key -> (type, where): "daemon" keys are DaemonOptions fields, "engine" keys Configuration fields.
DAEMON_KEYS: dict[str, type] = {
    "mode": str,
    "outside": str,
    "queue_num": int,
    "mark": int,
    "local_mark": int,
    "control": str,
    "keylog": str,
    "tep": str,
    "aead": str,
    "fail_closed": bool,
    "ipv6": bool,
    "pass_through": bool,
    "log_level": str,
    "workers": int,
    "metrics_file": str,
    "queue_backend": str,
    "queue_gso": bool,
    "queue_fail_open": bool,
    "cpus": str,
}
ENGINE_KEYS: dict[str, type] = {
    "rekey_bytes": int,
    "keepalive": float,
    "resume": bool,
    "resume_nonce_len": int,
    "resume_ttl": float,
    "resume_cache_size": int,
    "resume_per_peer": int,
    "embryonic_timeout": float,
    "tombstone_ttl": float,
    "max_tombstones": int,
    "max_sessions": int,
    "session_linger": float,
    "idle_timeout": float,
    "kex_timeout": float,
    "kex_retries": int,
    "held_limit": int,
    "ooo_limit": int,
    "ooo_total_limit": int,
    "syn_retries_with_eno": int,
    "deliver_max": int,
    "frame_max": int,
    "eno_app_aware": bool,
    "eno_app_aware_mandatory": bool,
    "eno_role_b": bool,
}
POLICY_KEYS: dict[str, type] = {
    "network": str, "port": int, "no_resume": bool, "no_cache": bool, "require": bool, "exclude": bool,
}
_OPTION_FIELD = {"tep": "teps", "aead": "aeads"}


def _check_type(key: str, value: Any, kind: type, where: str) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if key in ("tep", "aead", "outside") and isinstance(value, list) and all(isinstance(item, str) for item in value):
        return ",".join(value)
    if key == "cpus" and isinstance(value, list) and all(type(item) is int for item in value):
        return ",".join(map(str, value))
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: {key} must be {kind.__name__}, not {type(value).__name__} {value!r}")
    return value


def _policy(index: int, table: Any, source: str) -> PolicyRule:
    where = f"{source}: [[policy]] #{index + 1}"
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where} must be a table")
    values: dict[str, Any] = {}
    for raw_key, value in table.items():
        key = raw_key.replace("-", "_")
        if key not in POLICY_KEYS:
            raise ConfigError(f"{where}: unknown key {raw_key!r}; known: {', '.join(POLICY_KEYS)}")
        values[key] = _check_type(key, value, POLICY_KEYS[key], where)
    if "network" in values:
        try:
            ipaddress.ip_network(values["network"], strict=False)
        except ValueError as exc:
            raise ConfigError(f"{where}: network {values['network']!r}: {exc}") from None
    if "port" in values and not 0 < values["port"] < 65536:
        raise ConfigError(f"{where}: port {values['port']} is outside 1..65535")
    try:
        return PolicyRule(**values)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def policy_spec(text: str, action: str) -> PolicyRule:
    """`--require` / `--exclude` SPEC: NETWORK, @PORT or NETWORK@PORT (README: Security model)."""
    network, _, port = text.partition("@")
    table: dict[str, Any] = {action: True}
    if network:
        table["network"] = network
    if port:
        if not port.isdigit():
            raise ConfigError(f"--{action} {text!r}: port {port!r} is not a number")
        table["port"] = int(port)
    if len(table) == 1:
        raise ConfigError(f"--{action} {text!r}: give NETWORK, @PORT or NETWORK@PORT")
    return _policy(0, table, f"--{action} {text}")


def parse_file_text(text: str, source: str = "config") -> dict[str, Any]:
    """Validated settings from TOML text: {key: value} with underscore keys, `policies` a tuple."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    out: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = raw_key.replace("-", "_")
        if key in ("teps", "aeads"):
            key = key[:-1]
        if key in ("policy", "policies"):
            if not isinstance(value, list):
                raise ConfigError(f"{source}: {raw_key} must be an array of tables ([[policy]])")
            out["policies"] = tuple(_policy(i, table, source) for i, table in enumerate(value))
        elif key in DAEMON_KEYS:
            out[key] = _check_type(key, value, DAEMON_KEYS[key], source)
        elif key in ENGINE_KEYS:
            out[key] = _check_type(key, value, ENGINE_KEYS[key], source)
        else:
            known = ", ".join([*DAEMON_KEYS, *ENGINE_KEYS, "[[policy]]"])
            raise ConfigError(f"{source}: unknown key {raw_key!r}; known: {known}")
    return out


def load_file(path: str) -> dict[str, Any]:
    """Validated settings from the TOML file at `path`."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    return parse_file_text(text, path)


def options_from(file_values: Mapping[str, Any], cli_values: Mapping[str, Any]) -> DaemonOptions:
    """Defaults, then the file, then the command line (only the options actually given: not None)."""
    merged = dict(file_values)
    merged.update({key: value for key, value in cli_values.items() if value is not None})
    options = DaemonOptions()
    for key, value in merged.items():
        if key == "outside":
            options.outside = tuple(name.strip() for name in value.split(",") if name.strip())
        elif key == "cpus":
            options.cpus = parse_cpus(value)
        elif key in DAEMON_KEYS:
            setattr(options, _OPTION_FIELD.get(key, key), value)
        elif key in ENGINE_KEYS or key == "policies":
            options.engine[key] = value
    cli_rules = tuple(cli_values.get("cli_policies") or ())
    if cli_rules:  # the command line's rules come first: the first matching rule decides
        options.engine["policies"] = cli_rules + tuple(options.engine.get("policies", ()))
    for key, value in options.engine.items():
        if ENGINE_KEYS.get(key) in (int, float) and value < 0:
            raise ConfigError(f"{key.replace('_', '-')} must not be negative ({value})")
    _check_mode(options)
    if options.workers is not None and not 1 <= options.workers <= MAX_WORKERS:
        raise ConfigError(f"workers must be 1..{MAX_WORKERS}, not {options.workers}")
    _check_queue(options)
    if options.mark == options.local_mark:
        raise ConfigError(f"mark and local-mark must differ (both {options.mark:#x})")
    for name, value in (("mark", options.mark), ("local-mark", options.local_mark)):
        if value & ENCRYPTED_MARK:
            raise ConfigError(f"{name} {value:#x} uses bit {ENCRYPTED_MARK:#x}, which marks encrypted connections")
    options.configuration()  # validate now (names, ranges), before anything is installed
    return options


MAX_CPU = 4095
"""The largest CPU number `cpus` accepts (the kernel's NR_CPUS is at most 8192; a bound keeps a
typo such as "0-999999999" from building a huge set)."""


def parse_cpus(text: str) -> tuple[int, ...]:
    """`cpus`: CPU numbers and ranges, comma-separated ("0", "0,2-3"), in the order given (worker k
    gets the k-th), each once."""
    cpus: dict[int, None] = {}
    for part in (item.strip() for item in text.split(",")):
        first, dash, last = part.partition("-")
        if not _number(first) or (dash and not _number(last)):
            raise ConfigError(f"cpus {text!r}: {part!r} is not a CPU number or a range N-M")
        low, high = int(first), int(last) if dash else int(first)
        if low > high or high > MAX_CPU:
            raise ConfigError(f"cpus {text!r}: {part!r} is not a range within 0..{MAX_CPU}")
        cpus.update(dict.fromkeys(range(low, high + 1)))
    return tuple(cpus)


def _number(text: str) -> bool:
    return text.isascii() and text.isdigit()


def _check_queue(options: DaemonOptions) -> None:
    """A known backend; GSO only on the fast one (README: Queue backends)."""
    if options.queue_backend not in QUEUE_BACKENDS:
        raise ConfigError(f"unknown queue-backend {options.queue_backend!r}; known: {', '.join(QUEUE_BACKENDS)}")
    if options.queue_gso and options.queue_backend != "fast":
        raise ConfigError("queue-gso needs queue-backend fast (NetfilterQueue cannot set queue flags)")
    if options.queue_fail_open and options.queue_backend != "fast":
        raise ConfigError("queue-fail-open needs queue-backend fast (NetfilterQueue cannot set queue flags)")
    if options.queue_fail_open and not options.pass_through:
        raise ConfigError(
            "queue-fail-open is for --pass-through only: a full queue would let an encrypted connection's "
            "plaintext onto the wire and unauthenticated bytes into the stack"
        )


def gso_enabled(options: DaemonOptions) -> bool:
    """Whether the queues are bound with NFQA_CFG_F_GSO: asked for, or by default on the fast backend
    (the engine frames super-packets whole, docs/architecture.md: Sizes)."""
    if options.queue_gso is not None:
        return options.queue_gso
    return options.queue_backend == "fast"


def _check_mode(options: DaemonOptions) -> None:
    if options.mode not in MODES:
        raise ConfigError(f"unknown mode {options.mode!r}; known: {', '.join(MODES)}")
    if options.mode == "gateway" and not options.outside:
        raise ConfigError(
            "gateway mode needs --outside IF[,IF...] (config key outside): the interfaces toward the wire"
        )
    if options.mode == "host" and options.outside:
        raise ConfigError(f"outside ({','.join(options.outside)}) is for gateway mode only (--mode gateway)")
    bad = [name for name in options.outside if not valid_ifname(name)]
    if bad:
        raise ConfigError(f"outside: {', '.join(repr(name) for name in bad)} is not an interface name")
    if len(set(options.outside)) != len(options.outside):
        raise ConfigError(f"outside names an interface twice ({','.join(options.outside)})")
    deliver_max = options.engine.get("deliver_max")
    if deliver_max is not None and deliver_max < DELIVER_MAX_MIN:
        raise ConfigError(f"deliver-max {deliver_max} is below {DELIVER_MAX_MIN}")


def _interface_mtus(sys_net: str) -> dict[str, int]:
    """Interface name -> MTU, from sysfs."""
    mtus: dict[str, int] = {}
    try:
        names = os.listdir(sys_net)
    except OSError:
        return mtus
    for name in names:
        try:
            with open(os.path.join(sys_net, name, "mtu"), encoding="ascii") as handle:
                mtus[name] = int(handle.read().strip())
        except (OSError, ValueError):
            continue
    return mtus


def _matches(name: str, pattern: str) -> bool:
    return name.startswith(pattern[:-1]) if pattern.endswith("+") else name == pattern


def inside_deliver_max(mtus: Mapping[str, int], outside: tuple[str, ...], ipv6: bool) -> int | None:
    """The largest plaintext payload the engine may hand toward the inside in one packet.

    The smallest MTU of the inside interfaces (every one but lo and the outside ones), less the IP
    and TCP headers (40 bytes for IPv4, 60 with IPv6) and 20 bytes of TCP options (timestamps, SACK):
    a forwarded packet larger than the inside link MTU would be dropped. None when there is no
    inside interface.
    """
    inside = [
        mtu for name, mtu in mtus.items() if name != "lo" and not any(_matches(name, p) for p in outside)
    ]
    if not inside:
        return None
    return max(DELIVER_MAX_MIN, min(inside) - (60 if ipv6 else 40) - 20)


def resolve_system(options: DaemonOptions, sys_net: str = SYS_NET) -> None:
    """Check the options against this machine: the CPUs are ours to run on, outside interfaces
    exist; gateway `deliver_max` default.

    Raises ConfigError naming an interface that does not exist (a `prefix+` pattern must match one),
    or a CPU in `cpus` this process may not run on.
    """
    allowed = os.sched_getaffinity(0)
    missing = [cpu for cpu in options.cpus if cpu not in allowed]
    if missing:
        raise ConfigError(
            f"cpus: {', '.join(map(str, missing))} not available here (this process may run on {_cpu_list(allowed)})"
        )
    if options.mode != "gateway":
        return
    mtus = _interface_mtus(sys_net)
    for pattern in options.outside:
        if not any(_matches(name, pattern) for name in mtus):
            known = ", ".join(sorted(mtus)) or "none"
            raise ConfigError(f"outside interface {pattern!r} does not exist here (interfaces: {known})")
    if "deliver_max" not in options.engine:
        deliver_max = inside_deliver_max(mtus, options.outside, options.ipv6)
        if deliver_max is not None:
            options.engine["deliver_max"] = deliver_max
            logger.info("deliver-max %d (from the inside interfaces' MTU)", deliver_max)


def _cpu_list(cpus: set[int]) -> str:
    """CPU numbers as ranges: {0, 1, 2, 5} -> "0-2,5"."""
    out: list[str] = []
    for cpu in sorted(cpus):
        if out and cpu - 1 in cpus:
            out[-1] = f"{out[-1].split('-')[0]}-{cpu}"
        else:
            out.append(str(cpu))
    return ",".join(out)


def worker_count(options: DaemonOptions) -> int:
    """`options.workers`, or its default: 1 in host mode, one per CPU in gateway mode (one per CPU
    of `cpus` when given)."""
    if options.workers is not None:
        return options.workers
    if options.mode != "gateway":
        return 1
    return min(MAX_WORKERS, len(options.cpus) or os.cpu_count() or 1)


RELOADABLE = ("teps", "aeads", "engine")
"""What SIGHUP changes (new connections only); every other option needs a restart."""


def reload_options(options: DaemonOptions) -> DaemonOptions:
    """The options after re-reading `options.config_file` (the command line still wins).

    Raises ConfigError for a bad file. Options that cannot change while running keep their value,
    with a warning naming them.
    """
    file_values = load_file(options.config_file) if options.config_file else {}
    fresh = options_from(file_values, options.cli)
    resolve_system(fresh)
    fixed = [name for name in ("mode", "outside", "queue_num", "mark", "local_mark", "control", "keylog",
                               "fail_closed", "ipv6", "pass_through", "workers", "metrics_file",
                               "queue_backend", "queue_gso", "queue_fail_open", "cpus")
             if getattr(fresh, name) != getattr(options, name)]  # fmt: skip
    if fixed:
        logger.warning("reload: %s changed in the config; that takes a restart", ", ".join(fixed))
    for name in fixed:
        setattr(fresh, name, getattr(options, name))
    fresh.config_file, fresh.cli = options.config_file, options.cli
    return fresh


def cli_values(args: argparse.Namespace) -> dict[str, Any]:
    """The `run` options of a parsed command line, None where the option was not given."""
    keys = [*DAEMON_KEYS, *ENGINE_KEYS]
    values = {key: getattr(args, key, None) for key in keys}
    values["log_level"] = getattr(args, "sub_log_level", None)
    values["cli_policies"] = tuple(
        policy_spec(spec, action) for action in ("require", "exclude") for spec in getattr(args, action, None) or ()
    )
    return values
