"""Control socket: a root-only Unix socket answering one JSON request per connection (README: Control socket).

Request: one JSON object, e.g. {"cmd": "sessions"}, ended by a newline or by shutting down the write
side; other keys are the command's parameters. Reply: one JSON document, then the server closes the
connection. Commands: "sessions" (the engine's session table), "counters" (engine and shell
counters), "ping", "cache" (the resumption cache: peers and counters, never secrets), "cache_flush"
(optional "peer": an IP address; replies {"flushed": N}).
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_PATH = "/run/nfq-tcpcrypt/control.sock"
MAX_REQUEST = 64 * 1024
Commands = dict[str, Callable[[dict[str, Any]], Any]]
"""cmd -> handler; the handler gets the whole request object and returns a JSON-ready reply."""


class CommandError(ValueError):
    """A request a handler refuses; the client gets {"error": message}."""


class ControlServer:
    """Listening socket plus the partial requests of connected clients; driven by the loop's selector."""

    def __init__(self, path: str, commands: Commands) -> None:
        self.path = path
        self.commands = commands
        Path(path).parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        if os.path.exists(path) and _is_stale(path):
            os.unlink(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            self.sock.bind(path)
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)
        self.sock.listen(16)
        self.sock.setblocking(False)
        self.clients: dict[socket.socket, bytearray] = {}

    def accept(self) -> socket.socket | None:
        """Accept one client; the caller registers it with the selector."""
        try:
            conn, _ = self.sock.accept()
        except BlockingIOError:
            return None
        conn.setblocking(False)
        self.clients[conn] = bytearray()
        return conn

    def readable(self, conn: socket.socket) -> bool:
        """Read from a client; answer once the request is complete. True when `conn` is finished."""
        buf = self.clients[conn]
        try:
            chunk = conn.recv(4096)
        except BlockingIOError:
            return False
        except OSError:
            chunk = b""
            buf.clear()
        buf += chunk
        if chunk and b"\n" not in buf and len(buf) < MAX_REQUEST:
            return False
        if buf.strip():
            self._reply(conn, bytes(buf))
        return True

    def _reply(self, conn: socket.socket, request: bytes) -> None:
        try:
            message = json.loads(request.decode())
            cmd = message.get("cmd")
            handler = self.commands.get(cmd)
            reply = (
                handler(message) if handler else {"error": f"unknown cmd {cmd!r}", "known": sorted(self.commands)}
            )
        except CommandError as exc:
            reply = {"error": str(exc)}
        except (ValueError, AttributeError) as exc:
            reply = {"error": f"bad request: {exc}"}
        data = (json.dumps(reply) + "\n").encode()
        try:
            conn.settimeout(2.0)
            conn.sendall(data)
        except OSError as exc:
            logger.warning("control reply failed: %s", exc)

    def finish(self, conn: socket.socket) -> None:
        """Forget and close a client."""
        self.clients.pop(conn, None)
        conn.close()

    def close(self) -> None:
        """Close every socket and remove the socket file."""
        for conn in list(self.clients):
            self.finish(conn)
        self.sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def _is_stale(path: str) -> bool:
    """True when nobody listens on the socket at `path` (a crashed predecessor left it)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return True
    except OSError:
        return False
    finally:
        probe.close()
    raise FileExistsError(f"another daemon answers on {path}")


def query(path: str, cmd: str, timeout: float = 5.0, params: dict[str, Any] | None = None) -> Any:
    """Client side: send {"cmd": cmd, **params} to the daemon at `path` and return the decoded reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(json.dumps({**(params or {}), "cmd": cmd}).encode() + b"\n")
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    return json.loads(b"".join(chunks).decode())
