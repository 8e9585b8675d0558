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
