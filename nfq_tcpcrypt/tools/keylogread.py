"""Reading the daemon's key log for `decode` (the writer is shell/keylog.py).

Lines (README, "Key log"): `ES <N_A hex> <ES hex>` for a fresh key exchange (N_A as sent in Init1,
ES the key-agreement output) and `SS <resume[i] hex, 18 bytes> <ss[i] hex>` for a resumed session;
`#` starts a comment. Both daemons of a connection log the same ES line, so duplicates are normal.

Every session secret known (from an SS line, or ss[0] recomputed from an ES line and a capture) also
yields the next ones, ss[i+1] = CPRF(ss[i], CONST_NEXTK) with their resume identifiers (RFC 8548
§3.5), so a resumed connection decodes even when only the original session's ES line was logged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..core.kex import next_session_secret, resume_identifier

CHAIN_LOOKAHEAD = 16
RESUME_ID_LEN = 18


@dataclass
class KeyLog:
    """Secrets by lookup key: ES by N_A, ss[i] by resume[i]; plus the line problems seen."""

    es: dict[bytes, bytes] = field(default_factory=dict)
    ss: dict[bytes, bytes] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    path: str | None = None

    def add_chain(self, ss: bytes, include_self: bool = False) -> None:
        """Index the resume identifiers of the secrets that follow `ss` (and `ss` itself if asked)."""
        current = ss
        if include_self:
            self.ss.setdefault(resume_identifier(current), current)
        for _ in range(CHAIN_LOOKAHEAD):
            current = next_session_secret(current)
            self.ss.setdefault(resume_identifier(current), current)

    def find_resumed(self, half_x: bytes, half_y: bytes) -> tuple[bytes, bytes] | None:
        """(resume[i], ss[i]) whose halves are these two identifier halves, in either order."""
        for rid in (half_x + half_y, half_y + half_x):
            secret = self.ss.get(rid)
            if secret is not None:
                return rid, secret
        return None


def load_keylog(path: str) -> KeyLog:
    """Parse a key log file; malformed lines become problems, never exceptions (OSError aside)."""
    log = KeyLog(path=path)
    with open(path, encoding="ascii", errors="replace") as file:
        for number, line in enumerate(file, 1):
            parse_line(log, line, number)
    return log


def parse_line(log: KeyLog, line: str, number: int = 0) -> None:
    """Add one key-log line to `log`."""
    text = line.strip()
    if not text or text.startswith("#"):
        return
    parts = text.split()
    try:
        if len(parts) != 3:
            raise ValueError(f"{len(parts)} fields, expected 3")
        label, first, second = parts[0], bytes.fromhex(parts[1]), bytes.fromhex(parts[2])
    except ValueError as exc:
        log.problems.append(f"line {number}: {exc}")
        return
    if label == "ES":
        if len(first) != 32 or not second:
            log.problems.append(f"line {number}: ES needs a 32-byte N_A and a non-empty ES")
            return
        log.es[first] = second
    elif label == "SS":
        if len(first) != RESUME_ID_LEN or not second:
            log.problems.append(f"line {number}: SS needs an 18-byte resume identifier and a secret")
            return
        log.ss[first] = second
        log.add_chain(second)
    else:
        log.problems.append(f"line {number}: unknown label {label!r}")
