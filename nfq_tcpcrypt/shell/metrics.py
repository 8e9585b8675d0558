"""What an operator sees: counters from the engine's events, `status`, Prometheus text (README: Status and metrics).

`EventStats` counts the engine's events (core/events.py) in the shell: fresh and resumed handshakes,
fallbacks to plain TCP and aborts by reason, authentication (tag) failures. A reason is reduced to
its fixed part (the text before a colon, numbers replaced by N) and at most `MAX_REASONS` distinct
reasons are kept per kind, the rest counted as "other", so a peer cannot grow the table.

`status()` turns a counters dict (one worker's, or the sum over workers) into the `status`
document; `prometheus()` into the text exposition format (version 0.0.4), which `metrics` prints
and `--metrics-file` writes (atomically, by rename) for node_exporter's textfile collector.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Mapping
from typing import Any

from .. import __version__, build
from ..core.events import Event, FellBackToPlain, SessionAborted, SessionEstablished

MAX_REASONS = 32
FALLBACK, ABORT = "fallback:", "abort:"
TAG_FAILURE = "failed authentication"
METRICS_INTERVAL = 5.0
"""Seconds between two rewrites of `--metrics-file`."""
_NUMBER = re.compile(r"0x[0-9a-fA-F]+|\d+")
_EXPOSED = frozenset(
    {"handshakes_fresh", "handshakes_resumed", "tag_failures", "sessions", "cache_entries", "shell.workers"}
)
"""Counters that have a metric of their own (the gauges among them are no `events_total`)."""


def reason_class(reason: str) -> str:
    """The fixed part of an event reason: before any colon, numbers as N, at most 60 characters."""
    return _NUMBER.sub("N", reason.split(":", 1)[0]).strip()[:60] or "unknown"


OBSERVED = (SessionEstablished, FellBackToPlain, SessionAborted)
"""The events `EventStats.observe` counts: the loop hands it no other."""


class EventStats:
    """Counters derived from engine events (module docstring)."""

    def __init__(self) -> None:
        self.counters: dict[str, int] = {"handshakes_fresh": 0, "handshakes_resumed": 0, "tag_failures": 0}
        self._reasons: dict[str, set[str]] = {FALLBACK: set(), ABORT: set()}

    def _reason(self, kind: str, reason: str) -> None:
        name = reason_class(reason)
        seen = self._reasons[kind]
        if name not in seen:
            if len(seen) >= MAX_REASONS:
                name = "other"
            seen.add(name)
        key = kind + name
        self.counters[key] = self.counters.get(key, 0) + 1

    def observe(self, event: Event) -> None:
        """Count one event."""
        if isinstance(event, SessionEstablished):
            self.counters["handshakes_resumed" if event.resumed else "handshakes_fresh"] += 1
        elif isinstance(event, FellBackToPlain):
            self._reason(FALLBACK, event.reason)
        elif isinstance(event, SessionAborted):
            self._reason(ABORT, event.reason)
            if TAG_FAILURE in event.reason:
                self.counters["tag_failures"] += 1


def _by_prefix(counters: Mapping[str, int], prefix: str) -> dict[str, int]:
    return {name[len(prefix) :]: value for name, value in counters.items() if name.startswith(prefix)}


def queue_drops(counters: Mapping[str, int]) -> dict[str, dict[str, int]]:
    """Queue number -> {"queue_dropped", "user_dropped"} from the kernel.queueN.* counters."""
    out: dict[str, dict[str, int]] = {}
    for name, value in counters.items():
        match = re.fullmatch(r"kernel\.queue(\d+)\.(queue_dropped|user_dropped)", name)
        if match:
            out.setdefault(match.group(1), {})[match.group(2)] = value
    return out


def status(counters: Mapping[str, int], meta: Mapping[str, Any]) -> dict[str, Any]:
    """The `status` document: `meta` (mode, workers, pid, rules) plus the counters that matter."""
    drops = queue_drops(counters)
    return {
        "version": __version__,
        "build": build(),
        **meta,
        "handshakes": {"fresh": counters.get("handshakes_fresh", 0), "resumed": counters.get("handshakes_resumed", 0)},
        "fallbacks": _by_prefix(counters, FALLBACK),
        "aborts": _by_prefix(counters, ABORT),
        "tag_failures": counters.get("tag_failures", 0),
        "kernel_queue_drops": sum(sum(d.values()) for d in drops.values()),
        "sessions": counters.get("sessions", 0),
        "cache_entries": counters.get("cache_entries", 0),
        "counters": dict(counters),
    }


def _label(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def prometheus(doc: Mapping[str, Any]) -> str:
    """The text exposition format of a `status` document."""
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[dict[str, object], int]]) -> None:
        lines.append(f"# HELP nfq_tcpcrypt_{name} {help_text}")
        lines.append(f"# TYPE nfq_tcpcrypt_{name} {kind}")
        for labels, value in samples:
            text = ",".join(f'{key}="{_label(val)}"' for key, val in labels.items())
            lines.append(f"nfq_tcpcrypt_{name}{{{text}}} {value}" if text else f"nfq_tcpcrypt_{name} {value}")

    handshakes, fallbacks = doc["handshakes"], doc["fallbacks"]
    info = {"version": doc["version"], "mode": doc.get("mode"), "build": doc.get("build")}
    metric("info", "gauge", "Version, mode and build (compiled or pure Python) of the daemon.", [(info, 1)])
    metric("workers", "gauge", "Worker processes.", [({}, int(doc.get("workers", 1)))])
    metric("rules_installed", "gauge", "Rule lines the daemon has in place.", [({}, len(doc.get("rules", [])))])
    metric("connections_total", "counter", "TCP connections by outcome: encrypted, or plain TCP after a fallback.",
           [({"outcome": "encrypted"}, handshakes["fresh"] + handshakes["resumed"]),
            ({"outcome": "plain_fallback"}, sum(fallbacks.values()))])  # fmt: skip
    metric("handshakes_total", "counter", "Sessions keyed, by kind.",
           [({"kind": "fresh"}, handshakes["fresh"]), ({"kind": "resumed"}, handshakes["resumed"])])  # fmt: skip
    metric("fallbacks_total", "counter", "Connections left plain, by reason.",
           [({"reason": reason}, value) for reason, value in sorted(fallbacks.items())])  # fmt: skip
    metric("aborts_total", "counter", "Encrypted connections reset, by reason.",
           [({"reason": reason}, value) for reason, value in sorted(doc["aborts"].items())])  # fmt: skip
    metric("tag_failures_total", "counter", "Frames that failed authentication.", [({}, doc["tag_failures"])])
    drops = queue_drops(doc["counters"])
    metric("kernel_queue_drops_total", "counter", "Packets the kernel dropped (or bypassed) before we saw them.",
           [({"queue": queue, "kind": kind}, value) for queue, kinds in sorted(drops.items())
            for kind, value in sorted(kinds.items())])  # fmt: skip
    metric("sessions", "gauge", "Sessions in the table.", [({}, doc["sessions"])])
    metric("resumption_cache_entries", "gauge", "Peers with a cached session secret.", [({}, doc["cache_entries"])])
    plain = [(name, value) for name, value in sorted(doc["counters"].items())
             if not name.startswith((FALLBACK, ABORT, "kernel.")) and name not in _EXPOSED]  # fmt: skip
    metric("events_total", "counter", "Every other counter of the engine and the shell, by name.",
           [({"name": name}, int(value)) for name, value in plain])  # fmt: skip
    return "\n".join(lines) + "\n"


def write_textfile(path: str, text: str) -> None:
    """Replace `path` with `text` atomically (a temporary file in the same directory, renamed)."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".nfq-tcpcrypt-metrics.", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
