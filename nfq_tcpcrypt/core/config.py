"""Configuration of the engine: one dataclass, one docstring per field (STYLE.md §1)."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

from .constants import AEAD_NAMES, TEP_NAMES, Aead, Tep
from .errors import ConfigError
from .kex import KeyFactory, SystemKeyFactory


@dataclass
class Configuration:
    """Everything the engine needs from outside: policy, limits and the sources of randomness."""

    teps: tuple[Tep, ...] = (Tep.X25519,)
    """TEPs we offer and accept, most preferred first (RFC 8548 §3.2)."""

    aeads: tuple[Aead, ...] = (Aead.AES_128_GCM,)
    """AEADs we offer as A and choose from as B, most preferred first (RFC 8548 §3.3)."""

    random_bytes: Callable[[int], bytes] = secrets.token_bytes
    """Source of nonces; the OS CSPRNG in production, a seeded stream in tests (RFC 8548 §8)."""

    key_factory: KeyFactory = field(default_factory=SystemKeyFactory)
    """Makes ephemeral private keys (RFC 8548 §3.3: fresh per connection)."""

    secrets_log: Callable[[str], None] | None = None
    """Opt-in key log writer: receives one line per established session; None disables it."""

    max_sessions: int = 65536
    """Above this many sessions new connections pass through as plain TCP (counted)."""

    session_linger: float = 120.0
    """Seconds a closed or aborted session stays in the table (for `sessions` and late segments)."""

    idle_timeout: float = 7200.0
    """Seconds without a packet after which a session is dropped from the table."""

    kex_timeout: float = 1.0
    """First retransmission timeout of Init1/Init2, doubled on each try."""

    kex_retries: int = 6
    """Retransmissions of Init1/Init2 before the connection is aborted."""

    eno_app_aware: bool = False
    """Set the application-aware bit a in our ENO options (RFC 8547 §4.2)."""

    eno_app_aware_mandatory: bool = False
    """Disable ENO unless the peer sets a = 1 (RFC 8547 §4.2 mandatory application-aware mode)."""

    eno_role_b: bool = False
    """Set b = 1 on active opens; only useful for simultaneous open (RFC 8547 §4.2, §4.3)."""

    syn_retries_with_eno: int = 2
    """SYN retransmissions that keep the ENO option; later ones go without it and the connection
    stays plain (RFC 8547 §4.6: recovery from middleboxes that drop SYNs with ENO)."""

    rekey_bytes: int = 0
    """Start a new key generation after this many plaintext bytes sent; 0 disables (RFC 8548 §3.8)."""

    keepalive: float = 0.0
    """Seconds of silence after which we probe the peer with a rekey (RFC 8548 §3.9); 0 disables."""

    held_limit: int = 1 << 20
    """Plaintext bytes held per connection while the key exchange runs; beyond it, segments drop."""

    ooo_limit: int = 1 << 20
    """Wire bytes held per direction while a gap in the wire stream is open."""

    def __post_init__(self) -> None:
        if not self.teps:
            raise ConfigError("teps must name at least one TEP")
        if not self.aeads:
            raise ConfigError("aeads must name at least one AEAD")
        if len(set(self.teps)) != len(self.teps) or len(set(self.aeads)) != len(self.aeads):
            raise ConfigError("teps and aeads must not repeat a name")


def parse_teps(text: str) -> tuple[Tep, ...]:
    """Parse a comma-separated TEP list such as "x25519,p256" (most preferred first)."""
    return _parse_names(text, {name: tep for tep, name in TEP_NAMES.items()}, "tep")


def parse_aeads(text: str) -> tuple[Aead, ...]:
    """Parse a comma-separated AEAD list such as "aes128gcm,chacha20poly1305"."""
    return _parse_names(text, {name: aead for aead, name in AEAD_NAMES.items()}, "aead")


def _parse_names(text, table, what):  # type: ignore[no-untyped-def]
    names = [part.strip().lower() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in table]
    if unknown or not names:
        raise ConfigError(f"unknown {what} {','.join(unknown) or text!r}; known: {','.join(table)}")
    return tuple(table[name] for name in names)
