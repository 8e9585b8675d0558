"""Application API: the session ID of a connected socket (RFC 8547 §5.1).

RFC 8547 §5.1 asks every TCP-ENO implementation to give applications the session ID of their
connection, and an error when there is none (ENO failed, or the connection is not established), so
that applications can authenticate it (for example by signing "role | session ID", RFC 8547 §10).
With nfq_tcpcrypt the kernel knows nothing of ENO, so the daemon answers over its control socket.
That socket is root-only (mode 0600); an unprivileged program needs a privileged helper.

    import socket
    from nfq_tcpcrypt.api import session_id
    s = socket.create_connection(("10.77.0.2", 8080))
    sid = session_id(s)      # 33 bytes, or NoSessionId
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Any

from .core.flow import format_endpoint
from .shell.control import DEFAULT_PATH, query


class NoSessionId(LookupError):
    """The connection has no session ID: not through the daemon, plain TCP, or not yet keyed."""


@dataclass(frozen=True)
class SessionInfo:
    """What an application may learn of its connection (no secrets)."""

    session_id: bytes
    role: str  # "A" or "B" (RFC 8547 §4.3): authenticate it with the session ID (§10)
    tep: str
    aead: str
    resumed: bool
    peer_app_aware: bool  # the peer's a bit (RFC 8547 §4.2)


def endpoint(address: tuple[Any, ...]) -> str:
    """"ip:port" (or "[ip]:port") of a socket address, as the session table writes it."""
    ip = ipaddress.ip_address(address[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return format_endpoint(ip.packed, address[1])


def find_session(table: list[dict[str, Any]], local: str, remote: str) -> SessionInfo:
    """The keyed session for the 4-tuple (local, remote) in a `sessions` table, else NoSessionId."""
    for entry in table:
        if entry.get("local") == local and entry.get("remote") == remote:
            if not entry.get("session_id"):
                raise NoSessionId(f"{local} -> {remote}: no session ID (state {entry.get('state')})")
            return SessionInfo(
                bytes.fromhex(entry["session_id"]), entry["role"], entry["tep"], entry["aead"],
                bool(entry["resumed"]), bool(entry.get("peer_app_aware")),
            )
    raise NoSessionId(f"{local} -> {remote}: the daemon has no session for this connection")


def session_info(sock: socket.socket, control: str = DEFAULT_PATH) -> SessionInfo:
    """The session of a connected socket, asked of the local daemon."""
    local, remote = endpoint(sock.getsockname()), endpoint(sock.getpeername())
    try:
        table = query(control, "sessions")
    except OSError as exc:
        raise NoSessionId(f"no daemon answers on {control}: {exc}") from None
    return find_session(table, local, remote)


def session_id(sock: socket.socket, control: str = DEFAULT_PATH) -> bytes:
    """The 33-byte session ID of a connected socket (RFC 8547 §5.1), or NoSessionId."""
    return session_info(sock, control).session_id
