"""The wheel's contents as pyproject.toml declares them (README: Installing and running as a service)."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_package_is_listed_and_the_templates_are_mapped() -> None:
    """pyproject lists the packages by name (the templates' mapping needs it): a new subpackage must
    be added there, or an installed wheel lacks it."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {
        ".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "nfq_tcpcrypt").rglob("__init__.py")
    }
    assert found | {"nfq_tcpcrypt.iptables"} == set(setuptools["packages"])
    assert setuptools["package-dir"] == {"nfq_tcpcrypt.iptables": "iptables"}
    templates = {path.name for path in (ROOT / "iptables").glob("*.rules")}
    assert templates >= {"host.rules", "host6.rules", "gateway.rules", "gateway6.rules"}
    assert "*.rules" in setuptools["package-data"]["nfq_tcpcrypt.iptables"]
