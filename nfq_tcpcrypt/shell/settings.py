"""`run` settings from the command line and a TOML file (DESIGN.md §6): one table of keys, one merge.

The file holds the same keys as the `run` options, spelled with dashes or underscores
(`rekey-bytes = 65536` or `rekey_bytes = 65536`), plus `[[policy]]` tables (`network`, `port`,
`no_resume`, `no_cache`). The command line wins over the file, the file over the defaults. Unknown
keys and values of the wrong type are errors that name the key, never silently ignored.
"""

from __future__ import annotations

import argparse
import ipaddress
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..core.config import Configuration, PolicyRule, parse_aeads, parse_teps
from ..core.errors import ConfigError

DEFAULT_QUEUE_NUM = 7100
DEFAULT_MARK = 0x7463
DEFAULT_LOCAL_MARK = 0x7464
DEFAULT_CONTROL = "/run/nfq-tcpcrypt/control.sock"


@dataclass
class DaemonOptions:
    """What `nfq-tcpcrypt run` was asked to do."""

    mode: str = "host"
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
    engine: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of `core.config.Configuration` beyond teps/aeads (rekey_bytes, resume, policies...)."""

    def configuration(self, secrets_log: Any = None) -> Configuration:
        """The engine configuration these options describe."""
        return Configuration(
            teps=parse_teps(self.teps), aeads=parse_aeads(self.aeads), secrets_log=secrets_log, **self.engine
        )


# key -> (type, where): "daemon" keys are DaemonOptions fields, "engine" keys Configuration fields.
DAEMON_KEYS: dict[str, type] = {
    "mode": str,
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
}
ENGINE_KEYS: dict[str, type] = {
    "rekey_bytes": int,
    "keepalive": float,
    "resume": bool,
    "resume_nonce_len": int,
    "resume_ttl": float,
    "resume_cache_size": int,
    "max_sessions": int,
    "session_linger": float,
    "idle_timeout": float,
    "kex_timeout": float,
    "kex_retries": int,
    "held_limit": int,
    "ooo_limit": int,
    "syn_retries_with_eno": int,
    "eno_app_aware": bool,
    "eno_app_aware_mandatory": bool,
    "eno_role_b": bool,
}
POLICY_KEYS: dict[str, type] = {"network": str, "port": int, "no_resume": bool, "no_cache": bool}
_OPTION_FIELD = {"tep": "teps", "aead": "aeads"}


def _check_type(key: str, value: Any, kind: type, where: str) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if key in ("tep", "aead") and isinstance(value, list) and all(isinstance(item, str) for item in value):
        return ",".join(value)
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
    return PolicyRule(**values)


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
        if key in DAEMON_KEYS:
            setattr(options, _OPTION_FIELD.get(key, key), value)
        elif key in ENGINE_KEYS or key == "policies":
            options.engine[key] = value
    for key, value in options.engine.items():
        if ENGINE_KEYS.get(key) in (int, float) and value < 0:
            raise ConfigError(f"{key.replace('_', '-')} must not be negative ({value})")
    if options.mark == options.local_mark:
        raise ConfigError(f"mark and local-mark must differ (both {options.mark:#x})")
    options.configuration()  # validate now (names, ranges), before anything is installed
    return options


def cli_values(args: argparse.Namespace) -> dict[str, Any]:
    """The `run` options of a parsed command line, None where the option was not given."""
    keys = [*DAEMON_KEYS, *ENGINE_KEYS]
    values = {key: getattr(args, key, None) for key in keys}
    values["log_level"] = getattr(args, "sub_log_level", None)
    return values
