"""Traffic both ways at once for the lab and the benchmarks: each side of every connection sends
its own deterministic bytes while it receives the other's, then reports what it received.

    python -m nfq_tcpcrypt.lab.duplex serve ADDR PORT --send N [--connections K] [options]
    python -m nfq_tcpcrypt.lab.duplex connect ADDR PORT --send N [--connections K] [options]

The server prints "ready" once it listens. Each side ends with one JSON line: per connection the
bytes received and their SHA-256 (compare with `expected_sha256` of the peer's `--send`), or the
error. `--pause-after B --pause S` idles a sender for S seconds after B bytes (an idle connection
in the middle of a transfer); `--rcvbuf` sets SO_RCVBUF (a tiny receive buffer makes the stack
itself prune). With `--seconds T` each side sends `--send` bytes over and over for T seconds
instead, the receiver checks every byte against that pattern as it arrives and reports `mismatch`
(bytes that differ) and `rate` (bit/s from first to last byte): the benchmarks' mode.
Exit status 1 when any connection failed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import socket
import sys
import threading
import time
from typing import Any

CHUNK = 65536


def payload(role: str, size: int) -> bytes:
    """The bytes side `role` ("client" or "server") sends: SHAKE-256 of the role, `size` long."""
    return hashlib.shake_256(role.encode()).digest(size)


def expected_sha256(role: str, size: int) -> str:
    """SHA-256 of `payload(role, size)`."""
    return hashlib.sha256(payload(role, size)).hexdigest()


def _exchange(
    sock: socket.socket, data: bytes, pause_after: int, pause: float, seconds: float = 0.0,
    expect: bytes = b"",
) -> dict[str, Any]:
    """Send `data` (then shut down writing) while receiving until EOF; what was received. With
    `seconds`, send `data` cyclically for that long, and check what arrives against cyclic `expect`."""
    errors: list[str] = []

    def sender() -> None:
        try:
            sent = 0
            if seconds:
                view = memoryview(data)
                deadline = time.monotonic() + seconds
                while time.monotonic() < deadline:
                    at = sent % len(data)
                    sock.sendall(view[at : at + CHUNK])
                    sent += min(CHUNK, len(data) - at)
            while not seconds and sent < len(data):
                limit = pause_after if pause and sent < pause_after else len(data)
                end = min(sent + CHUNK, limit)
                sock.sendall(data[sent:end])
                sent = end
                if pause and sent == pause_after:
                    time.sleep(pause)
            sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            errors.append(f"send: {exc}")

    thread = threading.Thread(target=sender, daemon=True)
    thread.start()
    digest = hashlib.sha256()
    received = mismatch = 0
    first = last = 0.0
    try:
        while chunk := sock.recv(CHUNK):
            last = time.monotonic()
            first = first or last
            if seconds:
                at = received % len(expect)
                want = expect[at : at + len(chunk)]
                if len(want) < len(chunk):
                    want += expect[: len(chunk) - len(want)]
                if chunk != want:
                    mismatch += sum(x != y for x, y in zip(chunk, want, strict=True))
            else:
                digest.update(chunk)
            received += len(chunk)
    except OSError as exc:
        errors.append(f"recv: {exc}")
    last = time.monotonic()  # the rate counts a stall before EOF (or the error) as time spent
    thread.join()
    sock.close()
    result: dict[str, Any] = {"received": received, "error": "; ".join(errors) or None}
    if seconds:
        result.update(mismatch=mismatch, rate=received * 8 / (last - first) if last > first else 0.0)
    else:
        result["sha256"] = digest.hexdigest()
    return result


def _socket(family: int, rcvbuf: int | None, timeout: float) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(timeout)
    return sock


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="duplex", description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("serve", "connect"))
    parser.add_argument("address")
    parser.add_argument("port", type=int)
    parser.add_argument("--send", type=int, required=True, help="bytes to send on each connection")
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--pause-after", type=int, default=0)
    parser.add_argument("--pause", type=float, default=0.0)
    parser.add_argument("--rcvbuf", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds a socket may stall")
    parser.add_argument("--seconds", type=float, default=0.0, help="send cyclically for this long")
    args = parser.parse_args(argv)
    family = socket.AF_INET6 if ":" in args.address else socket.AF_INET
    role = "server" if args.mode == "serve" else "client"
    data = payload(role, args.send)
    expect = payload("client" if role == "server" else "server", args.send) if args.seconds else b""
    results: list[dict[str, Any]] = [{} for _ in range(args.connections)]
    started = time.monotonic()

    def run(i: int, sock: socket.socket) -> None:
        try:
            results[i] = _exchange(sock, data, args.pause_after, args.pause, args.seconds, expect)
        except OSError as exc:
            results[i] = {"received": 0, "sha256": None, "error": str(exc)}

    threads = []
    if args.mode == "serve":
        listener = _socket(family, args.rcvbuf, args.timeout)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((args.address, args.port))
        listener.listen(args.connections)
        print("ready", flush=True)
        for i in range(args.connections):
            try:
                conn, _ = listener.accept()
            except OSError as exc:
                results[i] = {"received": 0, "sha256": None, "error": f"accept: {exc}"}
                continue
            conn.settimeout(args.timeout)
            threads.append(threading.Thread(target=run, args=(i, conn)))
            threads[-1].start()
        listener.close()
    else:
        for i in range(args.connections):
            sock = _socket(family, args.rcvbuf, args.timeout)
            try:
                sock.connect((args.address, args.port))
            except OSError as exc:
                results[i] = {"received": 0, "sha256": None, "error": f"connect: {exc}"}
                sock.close()
                continue
            threads.append(threading.Thread(target=run, args=(i, sock)))
            threads[-1].start()
    for thread in threads:
        thread.join()
    print(json.dumps({"connections": results, "seconds": round(time.monotonic() - started, 3)}), flush=True)
    failed = [r for r in results if r.get("error") or not r.get("sha256", args.seconds) or r.get("mismatch")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
