"""Configuration of the engine: one dataclass, one docstring per field."""

from __future__ import annotations

import ipaddress
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from .constants import AEAD_NAMES, TEP_NAMES, Aead, Tep
from .errors import ConfigError
from .kex import KeyFactory, SystemKeyFactory

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PolicyRule:
    """Controls for connections to `network` and/or on `port` (either end): resumption, and
    whether encryption is required or the connection is left alone (README: Security model)."""

    network: str | None = None
    port: int | None = None
    no_resume: bool = False
    """Ignore resumption requests and offer none: always a fresh key exchange."""
    no_cache: bool = False
    """Cache no session secret from these connections."""
    require: bool = False
    """A connection that cannot be encrypted is reset toward both ends (counted, logged), never
    carried in plaintext: no opportunistic fallback (RFC 8547 §4.6 allows it only as policy)."""
    exclude: bool = False
    """Never touched: no ENO option, no session, passed as they are."""

    def __post_init__(self) -> None:
        if self.require and self.exclude:
            raise ConfigError("a policy rule cannot both require and exclude")

    def matches(self, remote_ip: bytes, local_port: int, remote_port: int) -> bool:
        """Whether the rule applies to a connection."""
        if self.port is not None and self.port not in (local_port, remote_port):
            return False
        if self.network is not None:
            return ipaddress.ip_address(remote_ip) in ipaddress.ip_network(self.network, strict=False)
        return True


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

    fast_paths: bool = True
    """Whether the per-packet fast paths run (docs/architecture.md: A packet's path). False sends
    every packet the general path, which decides the same: tests compare the two."""

    max_sessions: int = 65536
    """Sessions at most. At the limit a new connection evicts the oldest session that holds no
    keys (embryonic or plain), else the oldest that ended and lingers (it leaves a tombstone); when
    every session is live with keys it passes as plain TCP (counted)."""

    embryonic_timeout: float = 75.0
    """Seconds a session may stay before ENO succeeds (a spoofed SYN's session goes after this);
    Linux gives up a passive open after about 63 s of SYN-ACK retries."""

    session_linger: float = 120.0
    """Seconds a closed or aborted session stays in the table (for `sessions` and late segments)."""

    idle_timeout: float = 7200.0
    """Seconds without a packet after which a session is dropped from the table."""

    tombstone_ttl: float = 86400.0
    """Seconds an encrypted connection is remembered after its session left the table: its late
    packets reset both ends instead of passing in plaintext (README: Security model)."""

    max_tombstones: int = 65536
    """Tombstones at most (about 200 bytes each); the oldest go first."""

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

    resume: bool = True
    """Offer and accept session resumption (RFC 8548 §3.5)."""

    resume_nonce_len: int = 8
    """Bytes of fresh nonce each side adds to a resumption suboption, 0..8 (RFC 8548 §3.5: MUST
    default to 8); the nonces make a cloned or restored cache yield new keys."""

    resume_ttl: float = 3600.0
    """Seconds a cached session secret stays usable."""

    resume_cache_size: int = 4096
    """Cached secrets at most; the least recently used go first."""

    resume_per_peer: int = 16
    """Cached secrets per peer address at most; that peer's least recently used goes first."""

    policies: tuple[PolicyRule, ...] = ()
    """Per-port / per-network controls (RFC 8548 §3.5 cache controls)."""

    rekey_bytes: int = 0
    """Start a new key generation after this many plaintext bytes sent; 0 disables (RFC 8548 §3.8)."""

    keepalive: float = 0.0
    """Seconds of silence after which we probe the peer with a rekey (RFC 8548 §3.9); 0 disables."""

    deliver_max: int = 32768
    """Largest plaintext chunk handed to the local side in one packet (after a gap fills, many
    frames are ready at once). A host's own stack takes large packets; a gateway must stay within
    the inside link's MSS."""

    frame_max: int = 65518
    """Plain bytes per frame at most (RFC 8548 §4.2 allows 65,518): a super-packet of new data is
    cut into frames of this size (one AEAD call each). Smaller frames cost more calls and wire
    bytes; larger ones leave more data unopened at the receiver while a segment inside is lost."""

    gso_deliver: bool = True
    """A super-packet from the wire (GRO, a queue bound with GSO) is handed to the local stack in
    one verdict of up to 65,531 bytes, which the kernel keeps whole for a local socket. A gateway
    sets it off: what it forwards is segmented at the wire's segment size, which may not fit the
    inside link, so it stays within deliver_max (docs/architecture.md: Sizes)."""

    held_limit: int = 1 << 20
    """Plaintext bytes held per connection while the key exchange runs; beyond it, segments drop."""

    ooo_limit: int = 8 << 20
    """Wire bytes held per direction while a gap in the wire stream is open (and never beyond the
    window our stack offers). It covers a Linux receiver's default largest buffer (6 MiB,
    `net.ipv4.tcp_rmem`): with less, a segment lost while more is in flight makes the peer resend
    every byte beyond what we held (docs/architecture.md: Sizes)."""

    ooo_total_limit: int = 256 << 20
    """Out-of-order wire bytes all sessions together may hold (README: Memory bounds)."""

    def flags_for(self, remote_ip: bytes, local_port: int, remote_port: int) -> tuple[bool, bool]:
        """(no_resume, no_cache) for a connection, from the matching policy rules."""
        no_resume = no_cache = False
        for rule in self.policies:
            if rule.matches(remote_ip, local_port, remote_port):
                no_resume |= rule.no_resume
                no_cache |= rule.no_cache
        return no_resume or not self.resume, no_cache or not self.resume

    def policy_action(self, remote_ip: bytes, local_port: int, remote_port: int) -> str | None:
        """"require", "exclude" or None: the first matching rule that says either decides."""
        for rule in self.policies:
            if (rule.require or rule.exclude) and rule.matches(remote_ip, local_port, remote_port):
                return "require" if rule.require else "exclude"
        return None

    def __post_init__(self) -> None:
        if not self.teps:
            raise ConfigError("teps must name at least one TEP")
        if not self.aeads:
            raise ConfigError("aeads must name at least one AEAD")
        if len(set(self.teps)) != len(self.teps) or len(set(self.aeads)) != len(self.aeads):
            raise ConfigError("teps and aeads must not repeat a name")
        if not 0 <= self.resume_nonce_len <= 8:
            raise ConfigError(f"resume_nonce_len {self.resume_nonce_len} is outside 0..8 (RFC 8548 §3.5)")
        if self.resume_nonce_len == 0 and self.resume:
            logger.warning(
                "resume-nonce-len 0: a cloned or restored resumption cache yields the same keys again "
                "(RFC 8548 §3.5 asks for 8); use it only for interoperability tests"
            )


def parse_teps(text: str) -> tuple[Tep, ...]:
    """Parse a comma-separated TEP list such as "x25519,p256" (most preferred first)."""
    return _parse_names(text, {name: tep for tep, name in TEP_NAMES.items()}, "tep")


def parse_aeads(text: str) -> tuple[Aead, ...]:
    """Parse a comma-separated AEAD list such as "aes128gcm,chacha20poly1305"."""
    return _parse_names(text, {name: aead for aead, name in AEAD_NAMES.items()}, "aead")


_T = TypeVar("_T")


def _parse_names(text: str, table: dict[str, _T], what: str) -> tuple[_T, ...]:
    names = [part.strip().lower() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in table]
    if unknown or not names:
        raise ConfigError(f"unknown {what} {','.join(unknown) or text!r}; known: {','.join(table)}")
    return tuple(table[name] for name in names)
