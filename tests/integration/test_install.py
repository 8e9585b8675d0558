"""The daemon from an installed (non-editable) wheel: compiled (setup.py), with the rule templates
as package data."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from nfq_tcpcrypt.lab.net import HTTP_PORT, Topology, http_transfer

from .decoded import decoded_connections

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.own_backend  # it checks the installation (a minute of compiling), once: the default backend
@pytest.mark.timeout(600)
def test_installed_wheel_runs_in_a_namespace(topo: Topology, tmp_path: Path) -> None:
    """`pip install .` (not editable) into a fresh venv: its per-packet modules are compiled (the
    C module built beside them), and its `nfq-tcpcrypt` encrypts between a and b."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    install = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(ROOT)],
        capture_output=True, text=True, timeout=540, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-3000:]
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c",
         "import nfq_tcpcrypt as n, nfq_tcpcrypt.shell.rules as r, nfq_tcpcrypt.shell.fastqueue as q;"
         " print(r.__file__, r.templates_dir(), n.build(), q.NATIVE)"],
        capture_output=True, text=True, timeout=60, check=True, cwd=tmp_path,
    )  # fmt: skip
    module, templates, build, native = where.stdout.split()
    assert module.startswith(str(venv)) and templates.startswith(str(venv)), where.stdout
    assert build == "compiled" and native == "True", where.stdout  # the C module built too (_fastio.c)
    assert (Path(templates) / "host.rules").is_file() and (Path(templates) / "gateway6.rules").is_file()

    work = tmp_path / "run"
    work.mkdir()
    result = http_transfer(
        topo, work, size=256 * 1024, daemon_program=[str(venv / "bin" / "nfq-tcpcrypt")]
    )
    assert result.received_sha256 == result.sent_sha256
    assert result.wire.client_stream[:4].hex() == "15101a0e" and result.wire.leaks == {}
    for side, daemon in result.daemons.items():
        log = Path(daemon.log).read_text()
        assert daemon.proc.returncode == 0, log[-2000:]
        assert f"rules installed from {templates}" in log, log[-2000:]
        assert result.session_for(side) is not None, result.sessions
    assert result.pcap is not None
    (conn,) = decoded_connections(result.pcap, result.keylogs.values(), HTTP_PORT)
    session = result.session_for("a")
    assert session is not None and conn.session_id == session["session_id"]
