"""The checks of `vagrant/check`: the two-site lab in VMs, proved the way `nfq-tcpcrypt lab` proves the
namespace lab (same PASS lines for the encrypted transfer, same `decode` of the capture).

Run by `vagrant/check`, which installs what is needed, builds the box and always cleans up; this
script brings the VMs up, moves the traffic, captures on the host side of the VMs' links (their tap
devices) and prints the checks. Exit status 0 only when every check passed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nfq_tcpcrypt.lab.demo import decode_capture, print_checks, transfer_checks
from nfq_tcpcrypt.lab.net import HTTP_PORT, TransferResult, capture, make_payload, sha256_file, shell_faults
from nfq_tcpcrypt.tools.pcapcheck import analyze

HERE = Path(__file__).resolve().parent
NET = os.environ.get("NFQ_VAGRANT_NET", "10.231")
NETWORKS = {"site_a": 1, "site_b": 2, "internet": 3}  # as in the Vagrantfile
ADDRESSES = {
    "client": f"{NET}.1.10",
    "server": f"{NET}.2.10",
    "hostmode": f"{NET}.3.21",
    "plain": f"{NET}.3.22",
}
DAEMONS = ("gwa", "gwb", "hostmode")
IPERF_PORT = 5201
IPERF_PATTERN = b"0123456789" * 4  # iperf3 --repeating-payload
CONTROL = "/run/nfq-tcpcrypt/control.sock"
VENV_PYTHON = "/opt/nfq_tcpcrypt/venv/bin/python"


def mac(network: str, host: int) -> str:
    """The MAC the Vagrantfile gives `host` on `network`."""
    return f"52:54:00:e7:{NETWORKS[network]:02x}:{host:02x}"


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


class LabFailure(RuntimeError):
    """A step of the lab could not run (as opposed to a check that failed)."""


class Host:
    """The host side: `lab.net.capture` runs tcpdump through `popen` (here, in the root namespace)."""

    def popen(self, side: str, command: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        return subprocess.Popen(command, **kwargs)


class Vagrant:
    """vagrant commands in vagrant/, and ssh to its VMs with the configuration vagrant gives."""

    def __init__(self, workdir: Path, box: str) -> None:
        self.workdir = workdir
        self.env = dict(os.environ, VAGRANT_CWD=str(HERE), NFQ_VAGRANT_BOX=box)
        self.log = workdir / "vagrant.log"
        self.ssh_config = workdir / "ssh_config"

    def up(self, timeout: float) -> None:
        """`vagrant up` (the libvirt provider boots the VMs in parallel); progress lines are printed."""
        started = time.monotonic()
        with open(self.log, "ab") as log:
            proc = subprocess.Popen(
                ["vagrant", "up", "--provider", "libvirt"],
                env=self.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            assert proc.stdout is not None
            try:
                for raw in proc.stdout:
                    log.write(raw)
                    log.flush()
                    line = raw.decode(errors="replace").rstrip()
                    if any(word in line for word in ("Machine booted and ready", "provision: ", "rror")):
                        print(f"  [{time.monotonic() - started:6.0f} s] {line.strip()}", flush=True)
                    if time.monotonic() - started > timeout:
                        raise LabFailure(f"vagrant up took more than {timeout:.0f} s")
                proc.wait(timeout=60)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        if proc.returncode != 0:
            tail = self.log.read_text(errors="replace").splitlines()[-40:]
            raise LabFailure("vagrant up failed:\n" + "\n".join("    " + line for line in tail))
        config = subprocess.run(
            ["vagrant", "ssh-config"], env=self.env, capture_output=True, text=True, timeout=300, check=True
        )
        self.ssh_config.write_text(config.stdout)

    def ssh(self, machine: str, command: str, timeout: float = 120.0, check: bool = True) -> str:
        """Run `command` (a shell line) in `machine`; its stdout."""
        result = subprocess.run(
            ["ssh", "-F", str(self.ssh_config), "-o", "LogLevel=ERROR", "-o", "BatchMode=yes", machine, command],
            capture_output=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise LabFailure(
                f"{machine}: `{command}` exited {result.returncode}: {result.stderr.decode(errors='replace')[-1500:]}"
            )
        return result.stdout.decode(errors="replace")

    def put(self, machine: str, local: Path, remote: str) -> None:
        """Copy a file into `machine` (as root)."""
        with open(local, "rb") as data:
            result = subprocess.run(
                ["ssh", "-F", str(self.ssh_config), "-o", "LogLevel=ERROR", machine,
                 f"sudo tee {shlex.quote(remote)} >/dev/null"],
                stdin=data, capture_output=True, timeout=300, check=False,
            )  # fmt: skip
        if result.returncode != 0:
            raise LabFailure(f"copy to {machine}:{remote} failed: {result.stderr.decode(errors='replace')}")

    def sessions(self, machine: str) -> list[dict[str, Any]]:
        table: list[dict[str, Any]] = json.loads(self.ssh(machine, "sudo nfq-tcpcrypt sessions --json"))
        return table

    def counters(self, machine: str) -> dict[str, int]:
        code = (
            "import json; from nfq_tcpcrypt.shell.control import query; "
            f"print(json.dumps(query({CONTROL!r}, 'counters')))"
        )
        counters: dict[str, int] = json.loads(self.ssh(machine, f"sudo {VENV_PYTHON} -c {shlex.quote(code)}"))
        return counters

    def fetch(self, machine: str, url: str, out: str) -> float:
        """curl `url` in `machine` into `out`; the seconds it took."""
        started = time.monotonic()
        self.ssh(machine, f"curl -sS --fail --max-time 300 -o {out} {url}", timeout=330)
        return time.monotonic() - started

    def sha256(self, machine: str, path: str) -> str:
        return self.ssh(machine, f"sha256sum {path}").split()[0]


def tap_of(domain: str, address: str) -> str:
    """The host's tap device of the VM interface with MAC `address` (`virsh domiflist`)."""
    listing = subprocess.run(["virsh", "domiflist", domain], capture_output=True, text=True, check=True).stdout
    for line in listing.splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[-1].lower() == address:
            return fields[0]
    raise LabFailure(f"no interface {address} in {domain}:\n{listing}")


@contextlib.contextmanager
def captures(workdir: Path, phase: str, taps: dict[str, str]) -> Iterator[dict[str, Path]]:
    """tcpdump on each named tap for the duration of the block: name -> pcap."""
    paths = {name: workdir / f"{phase}-{name}.pcap" for name in taps}
    with contextlib.ExitStack() as stack:
        for name, tap in taps.items():
            stack.enter_context(capture(Host(), "host", paths[name], ifname=tap, timeout=30.0))  # type: ignore[arg-type]
        yield paths


def session_to(table: list[dict[str, Any]], address: str, port: int) -> list[dict[str, Any]]:
    """The entries of a session table whose remote end is address:port."""
    return [entry for entry in table if str(entry.get("remote", "")) == f"{address}:{port}"]


def run(size: int, bulk_seconds: int, box: str, keep: str | None, up_timeout: float) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="nfq-tcpcrypt-vmlab-"))
    vms = Vagrant(workdir, box)
    checks: list[tuple[str, bool]] = []
    started = time.monotonic()
    try:
        print("vmlab: vagrant up: client, gwa, gwb, server, hostmode, plain (box " + box + ") ...", flush=True)
        vms.up(up_timeout)
        print(f"vmlab: all VMs up and provisioned in {time.monotonic() - started:.0f} s", flush=True)
        taps = {
            "internet": tap_of("nfqvg_gwa", mac("internet", 11)),
            "site_a": tap_of("nfqvg_gwa", mac("site_a", 2)),
            "site_b": tap_of("nfqvg_gwb", mac("site_b", 2)),
        }
        www = workdir / "www"
        www.mkdir()
        payload = www / "payload.bin"
        markers = make_payload(payload, size)
        needles = {f"marker{i}": marker for i, marker in enumerate(markers)}
        needles["http-status-line"] = b"HTTP/1.0 200"
        sent_sha256 = sha256_file(payload)
        for machine in ("server", "hostmode", "plain"):
            vms.put(machine, payload, "/srv/www/payload.bin")
        server, hostmode, plain, client = (ADDRESSES[k] for k in ("server", "hostmode", "plain", "client"))

        print(f"vmlab: HTTP: client fetches {size} random bytes from server (site A -> gwa => gwb -> site B)")
        with captures(workdir, "http", taps) as pcaps:
            seconds = vms.fetch("client", f"http://{server}:{HTTP_PORT}/payload.bin", "/tmp/payload.bin")
            sessions = {gw: vms.sessions(gw) for gw in ("gwa", "gwb")}
        received_sha256 = vms.sha256("client", "/tmp/payload.bin")
        print(f"  fetched in {seconds:.1f} s")

        print(f"vmlab: bulk: iperf3 client -> server for {bulk_seconds} s, through the gateways")
        with captures(workdir, "bulk", {"internet": taps["internet"]}) as bulk_pcaps:
            bulk = json.loads(
                vms.ssh(
                    "client",
                    f"iperf3 -c {server} -t {bulk_seconds} --repeating-payload -J",
                    timeout=bulk_seconds + 120,
                )
            )
            bulk_sessions = session_to(vms.sessions("gwa"), server, IPERF_PORT)
        bulk_mbps = bulk["end"]["sum_received"]["bits_per_second"] / 1e6

        print("vmlab: gateway <-> host mode: client fetches the file from hostmode (a daemon in host mode)")
        with captures(workdir, "hostmode", {"internet": taps["internet"]}) as hm_pcaps:
            vms.fetch("client", f"http://{hostmode}:{HTTP_PORT}/payload.bin", "/tmp/hostmode.bin")
            hm_gwa = session_to(vms.sessions("gwa"), hostmode, HTTP_PORT)
            hm_host = [e for e in vms.sessions("hostmode") if str(e.get("local", "")).endswith(f":{HTTP_PORT}")]
        hm_sha256 = vms.sha256("client", "/tmp/hostmode.bin")

        print("vmlab: fallback: client fetches the file from plain (no daemon)")
        with captures(workdir, "plain", {"internet": taps["internet"]}) as plain_pcaps:
            vms.fetch("client", f"http://{plain}:{HTTP_PORT}/payload.bin", "/tmp/plain.bin")
            plain_gwa = session_to(vms.sessions("gwa"), plain, HTTP_PORT)
        plain_sha256 = vms.sha256("client", "/tmp/plain.bin")

        counters = {daemon: vms.counters(daemon) for daemon in DAEMONS}
        keylogs = {daemon: vms.ssh(daemon, "sudo cat /var/lib/nfq-tcpcrypt/keys.log") for daemon in DAEMONS}
        exits, rules_left = {}, {}
        for daemon in DAEMONS:
            vms.ssh(daemon, "sudo systemctl stop nfq-tcpcrypt.service", timeout=120)
            shown = vms.ssh(daemon, "systemctl show -p ExecMainCode -p ExecMainStatus nfq-tcpcrypt.service")
            exits[daemon] = dict(line.split("=", 1) for line in shown.split())
            rules_left[daemon] = int(vms.ssh(daemon, "sudo iptables-save | grep -c NFQUEUE || true").strip() or 0)
            if exits[daemon] != {"ExecMainCode": "1", "ExecMainStatus": "0"} or rules_left[daemon]:
                # Say why before the machines are gone: the exit, the rules left, the daemon's last words.
                print(f"  {daemon}: stop gave {exits[daemon]}, {rules_left[daemon]} NFQUEUE rule line(s) left;"
                      " its journal:")  # fmt: skip
                journal = vms.ssh(daemon, "sudo journalctl -u nfq-tcpcrypt.service -n 40 --no-pager", check=False)
                print("".join(f"  | {line}\n" for line in journal.splitlines()), end="")

        print("vmlab: baseline: the same iperf3 run with both gateways' daemons stopped (plain TCP)")
        base = json.loads(
            vms.ssh("client", f"iperf3 -c {server} -t {bulk_seconds} -J", timeout=bulk_seconds + 120)
        )
        base_mbps = base["end"]["sum_received"]["bits_per_second"] / 1e6

        # --- the namespace lab's checks, on the gateways' capture and tables ---------------------
        result = TransferResult(
            sent_sha256=sent_sha256,
            received_sha256=received_sha256,
            wire=analyze(pcaps["internet"], client, server, HTTP_PORT, needles),
            sessions=sessions,
            counters=counters,
            keylogs={gw: keylogs[gw] for gw in ("gwa", "gwb")},
            pcap=pcaps["internet"],
        )
        report = decode_capture(result, workdir, "gwa's internet link (host side)")
        checks.extend(transfer_checks(result, report, size, ("gwa", "gwb")))

        # --- inside links: plain TCP, no ENO ---------------------------------------------------------
        for link in ("site_a", "site_b"):
            inside = analyze(pcaps[link], client, server, HTTP_PORT, needles)
            saw = inside.client_stream.startswith(b"GET /payload.bin") and bool(inside.leaks)
            print(f"  {link}: SYN ENO {inside.syn_has_eno}, SYN-ACK ENO {inside.synack_has_eno}, plaintext seen {saw}")
            checks.append((f"no ENO on the inside link {link} (plain HTTP seen there)",
                           saw and not inside.syn_has_eno and not inside.synack_has_eno))  # fmt: skip

        # --- bulk -------------------------------------------------------------------------------------
        bulk_raw = bulk_pcaps["internet"].read_bytes()
        ratio = bulk_mbps / base_mbps if base_mbps else 0.0
        print(f"  bulk: {bulk_mbps:.1f} Mbit/s encrypted, {base_mbps:.1f} Mbit/s plain (same run), "
              f"ratio {ratio:.3f}; gwa sessions to iperf3: {len(bulk_sessions)}")  # fmt: skip
        checks.append(("bulk: iperf3 connections encrypted by gwa (session IDs)",
                       len(bulk_sessions) >= 2 and all(e.get("session_id") for e in bulk_sessions)))  # fmt: skip
        checks.append(("bulk: no iperf3 payload pattern on the wire", bulk_raw.count(IPERF_PATTERN) == 0))
        checks.append(("bulk: bytes arrived", bulk["end"]["sum_received"]["bytes"] > 0))

        # --- host mode peer ---------------------------------------------------------------------------
        hm_wire = analyze(hm_pcaps["internet"], client, hostmode, HTTP_PORT, needles)
        ids = {e.get("session_id") for e in hm_gwa} | {e.get("session_id") for e in hm_host}
        print(f"  hostmode: gwa {len(hm_gwa)} session(s), hostmode {len(hm_host)}, session IDs {sorted(map(str, ids))}")
        checks.append(("host mode: gwa and hostmode report one session, IDs equal",
                       len(hm_gwa) == 1 and len(hm_host) == 1 and len(ids) == 1 and None not in ids))  # fmt: skip
        checks.append(("host mode: digests equal", hm_sha256 == sent_sha256))
        checks.append(("host mode: ENO in SYN and SYN-ACK, no plaintext on the wire",
                       hm_wire.syn_has_eno and hm_wire.synack_has_eno and not hm_wire.leaks))  # fmt: skip

        # --- fallback -----------------------------------------------------------------------------------
        plain_wire = analyze(plain_pcaps["internet"], client, plain, HTTP_PORT, needles)
        print(f"  plain: SYN ENO {plain_wire.syn_has_eno}, SYN-ACK ENO {plain_wire.synack_has_eno}, "
              f"plaintext on the wire {', '.join(plain_wire.leaks) or 'none'}")  # fmt: skip
        checks.append(("fallback: gwa offered ENO, plain answered without it", plain_wire.syn_has_eno
                       and not plain_wire.synack_has_eno))  # fmt: skip
        checks.append(("fallback: plain TCP, digests equal, no session at gwa",
                       plain_sha256 == sent_sha256 and bool(plain_wire.leaks)
                       and not any(e.get("session_id") for e in plain_gwa)))  # fmt: skip

        # --- daemons ------------------------------------------------------------------------------------
        for daemon in DAEMONS:
            faults = shell_faults(counters.get(daemon, {}))
            checks.append(
                (f"daemon {daemon}: no engine errors, truncated copies or failed injections {faults or ''}", not faults)
            )
            code = exits[daemon]
            checks.append((f"daemon {daemon} exited 0 after SIGTERM (systemctl stop), its rules removed",
                           code.get("ExecMainCode") == "1" and code.get("ExecMainStatus") == "0"
                           and rules_left[daemon] == 0))  # fmt: skip
        print()
        status = print_checks(checks, "vmlab")
    except LabFailure as error:
        print(f"vmlab: FAILED: {error}")
        status = 1
    except KeyboardInterrupt:
        print("vmlab: interrupted")
        status = 130
    finally:
        if keep:
            dest = Path(keep)
            dest.mkdir(parents=True, exist_ok=True)
            for item in workdir.iterdir():
                if item.is_file() and item.name != "ssh_config":
                    shutil.copy2(item, dest / item.name)
            print(f"vmlab: captures, key logs and vagrant's log copied to {dest}")
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"vmlab: {time.monotonic() - started:.0f} s from vagrant up to the verdict")
    return status


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--box", default=os.environ.get("NFQ_VAGRANT_BOX", "nfq-tcpcrypt/bookworm"))
    parser.add_argument("--size", type=int, default=2 * 1024 * 1024, help="bytes of the HTTP file")
    parser.add_argument("--bulk-seconds", type=int, default=5)
    parser.add_argument("--up-timeout", type=float, default=2400.0)
    parser.add_argument("--keep", metavar="DIR", help="keep the captures and vagrant's log in DIR")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _raise_interrupt)
    return run(args.size, args.bulk_seconds, args.box, args.keep, args.up_timeout)


if __name__ == "__main__":
    sys.exit(main())
