"""`nfq-tcpcrypt lab`: the two-namespace demo (README: Try it), built from the same helpers as the tests.

Its final proof is `decode`: the capture of the wire plus the daemons' key logs give the
negotiation, the session ID and the verified plaintext, which must match what the daemons and the
served file say.
"""

from __future__ import annotations

import hashlib
import shutil
import signal
import tempfile
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from ..tools.decode import DecodeReport, decode_pcap, render_text
from .net import HTTP_PORT, Topology, http_transfer, shell_faults


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def role_file(role: str) -> Path:
    """The lab role's config file (`nfq_tcpcrypt/roles/ROLE.toml`), shared with the Vagrant lab."""
    return Path(str(resources.files("nfq_tcpcrypt") / "roles" / f"{role}.toml"))


def run_lab(size: int = 4 * 1024 * 1024, keep: str | None = None) -> int:
    """Run the demo and print the checks; 0 when every check passes."""
    old = signal.signal(signal.SIGTERM, _raise_interrupt)
    workdir = Path(tempfile.mkdtemp(prefix="nfq-tcpcrypt-lab-"))
    try:
        print(f"lab: building namespaces, starting both daemons, moving {size} random bytes over HTTP ...")
        with Topology("nfqlab") as topo:
            print(
                f"lab: namespaces {topo.names['a']} (10.77.0.1, curl) and {topo.names['b']} (10.77.0.2, http.server)"
            )
            host_role = ["--config", str(role_file("host"))]
            result = http_transfer(topo, workdir, size=size, daemon_args={"a": host_role, "b": host_role})
        return _report(result, decode_capture(result, workdir), size)
    except KeyboardInterrupt:
        print("lab: interrupted; cleaned up")
        return 130
    finally:
        signal.signal(signal.SIGTERM, old)
        if keep:
            dest = Path(keep)
            dest.mkdir(parents=True, exist_ok=True)
            for item in workdir.iterdir():
                if item.is_file():
                    shutil.copy2(item, dest / item.name)
            print(f"lab: capture, key logs and daemon logs copied to {dest}")
        shutil.rmtree(workdir, ignore_errors=True)


def decode_capture(result: Any, workdir: Path, where: str = "a's wire") -> DecodeReport | None:
    """`nfq-tcpcrypt decode` of the capture with both key logs; its text is printed."""
    if result.pcap is None:
        return None
    keylog = workdir / "both.keys"
    keylog.write_text("".join(result.keylogs.values()))
    plain = workdir / "plaintext"
    report = decode_pcap(str(result.pcap), str(keylog), str(plain))
    print(f"lab: `nfq-tcpcrypt decode` of the capture of {where}, with the key logs:\n")
    print("\n".join("  | " + line for line in render_text(report).splitlines()))
    print()
    return report


def _decode_checks(report: DecodeReport | None, result: Any, size: int, side: str = "a") -> list[tuple[str, bool]]:
    """The decoded capture agrees with the daemons and with the served file."""
    conns = [c for c in report.connections if c.server.endswith(f":{HTTP_PORT}")] if report else []
    checks = [("decode: one HTTP connection in the capture", len(conns) == 1)]
    if len(conns) != 1:
        return checks
    conn = conns[0]
    a = result.session_for(side)
    checks.append(("decode: connection encrypted, handshake complete", conn.status == "encrypted"))
    checks.append(
        (
            "decode: session ID from the capture equals the daemons'",
            a is not None and conn.session_id is not None and conn.session_id == a.get("session_id"),
        )
    )
    verified = all(d.framing_valid and d.failed == 0 and d.verified > 0 for d in conn.directions)
    checks.append(("decode: every frame verified in both directions", verified))
    server = next((d for d in conn.directions if d.side == "server"), None)
    body_digest = None
    if server is not None and server.plaintext_file and server.plaintext_complete:
        body = Path(server.plaintext_file).read_bytes()
        body_digest = hashlib.sha256(body[-size:]).hexdigest()
    print(f"  sha256 decrypted:     {body_digest} (HTTP body in the decrypted capture)")
    checks.append(("decode: decrypted body digest equals the file's", body_digest == result.sent_sha256))
    return checks


def _report(result: Any, report: DecodeReport | None = None, size: int = 0) -> int:
    checks = transfer_checks(result, report, size)
    for side, daemon in result.daemons.items():
        faults = shell_faults(result.counters.get(side, {}))
        checks.append(
            (
                f"daemon {side}: no engine errors, truncated copies or failed injections {faults or ''}",
                not faults,
            )
        )
        checks.append((f"daemon {side} exited 0 after SIGTERM", daemon.proc.returncode == 0))
    print()
    return print_checks(checks, "lab")


def print_checks(checks: Sequence[tuple[str, bool]], prefix: str) -> int:
    """The PASS/FAIL lines and the verdict; 0 when every check passed."""
    for name, ok in checks:
        print(f"  [{'PASS' if ok else 'FAIL'}] {name}")
    ok = all(passed for _, passed in checks)
    print(f"\n{prefix}: {'all checks passed' if ok else 'SOME CHECKS FAILED'}")
    return 0 if ok and checks else 1


def transfer_checks(
    result: Any, report: DecodeReport | None = None, size: int = 0, sides: tuple[str, str] = ("a", "b")
) -> list[tuple[str, bool]]:
    """The namespace lab's checks of one encrypted HTTP transfer (sessions, digests, wire, decode).

    `result` is a `lab.net.TransferResult`; `sides` name the two daemons in it (client side first).
    The Vagrant lab (vagrant/) runs the same checks on its VMs."""
    checks: list[tuple[str, bool]] = []
    a, b = result.session_for(sides[0]), result.session_for(sides[1])
    for side, entry in ((sides[0], a), (sides[1], b)):
        if entry is None:
            print(f"  session ({side}):       none found in the daemon's table")
        else:
            print(
                f"  session ({side}):       {entry.get('local')} -> {entry.get('remote')} state={entry.get('state')} "
                f"tep={entry.get('tep')} aead={entry.get('aead')} resumed={entry.get('resumed')}"
            )
            print(f"  session ID ({side}):    {entry.get('session_id')}")
    checks.append(("both ends report a session", a is not None and b is not None))
    if a is not None and b is not None:
        checks.append(
            ("session IDs equal", a.get("session_id") == b.get("session_id") and bool(a.get("session_id")))
        )
        checks.append(
            (
                "TEP x25519, AEAD aes128gcm",
                a.get("tep") == b.get("tep") == "x25519" and a.get("aead") == b.get("aead") == "aes128gcm",
            )
        )
    print(f"  sha256 sent:          {result.sent_sha256}")
    print(f"  sha256 received:      {result.received_sha256}")
    checks.append(("digests equal", result.sent_sha256 == result.received_sha256))
    wire = result.wire
    print(f"  wire packets seen:    {wire.packets}")
    print(f"  ENO (kind 69):        SYN {wire.syn_has_eno}, SYN-ACK {wire.synack_has_eno}")
    print(
        f"  stream starts:        a->b {wire.client_stream[:4].hex()} (Init1 15101a0e), "
        f"b->a {wire.server_stream[:4].hex()} (Init2 097105e0)"
    )
    checks.append(("ENO in SYN and SYN-ACK", wire.syn_has_eno and wire.synack_has_eno))
    checks.append(
        ("Init1 / Init2 at stream starts", wire.client_starts_with_init1 and wire.server_starts_with_init2)
    )
    leaked = ", ".join(f"{name} x{count}" for name, count in wire.leaks.items()) or "none"
    print(f"  plaintext on wire:    {leaked}")
    checks.append(("no plaintext on the wire", not wire.leaks))
    checks.extend(_decode_checks(report, result, size, sides[0]))
    return checks
