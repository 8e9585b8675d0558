"""The import rule of docs/architecture.md ("Layers"): the core stays sans-I/O."""

from __future__ import annotations

import ast
from pathlib import Path

import nfq_tcpcrypt.core

BANNED = {"socket", "netfilterqueue", "scapy", "pyroute2", "threading", "select", "selectors", "time",
          "subprocess", "asyncio", "os", "secrets", "random"}
ALLOWED = {("config.py", "secrets")}  # the production default of Configuration.random_bytes


def test_core_imports_no_io():
    root = Path(nfq_tcpcrypt.core.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in BANNED and (path.name, top) not in ALLOWED:
                    offenders.append(f"{path.relative_to(root)} imports {name}")
    assert offenders == []


def test_daemon_path_never_loads_the_lab():
    """`nfq-tcpcrypt run` and everything in core and shell load neither the lab (nfq_tcpcrypt.lab:
    subprocess, curl, iperf3 drivers) nor scapy, statically and at run time."""
    import subprocess
    import sys

    package = Path(nfq_tcpcrypt.core.__file__).parent.parent
    offenders = []
    for sub in ("core", "shell"):
        for path in (package / sub).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom):
                    module = "." * node.level + (node.module or "")
                    names = [module] + [f"{module}.{alias.name}" for alias in node.names]
                elif isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                else:
                    continue
                if any(".lab" in name or name.startswith(("nfq_tcpcrypt.lab", "scapy")) for name in names):
                    offenders.append(f"{path.relative_to(package)}: {names[0]}")
    assert offenders == []
    modules = sorted(
        "nfq_tcpcrypt." + ".".join(path.relative_to(package).with_suffix("").parts)
        for sub in ("core", "shell") for path in (package / sub).rglob("*.py") if path.name != "__init__.py"
    )
    probe = (
        "import importlib, sys\n"
        "import nfq_tcpcrypt.__main__ as main\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "try:\n    main.main(['run', '--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in sys.modules if m.startswith('nfq_tcpcrypt.lab') or m.startswith('scapy')))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout[-2000:]
