"""The labs' role files in the namespace topologies: the two-site lab with `--config gateway.toml`,
the Vagrant lab's gateway role (`nfq-tcpcrypt lab` runs `host.toml` the same way)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from nfq_tcpcrypt.lab.demo import role_file
from nfq_tcpcrypt.lab.net import IFNAMES, Topology, http_transfer

from .conftest import lab_topology
from .test_gateway import SIZE, _assert_clean, _assert_encrypted, _assert_plain_inside


@pytest.fixture
def sites() -> Iterator[Topology]:
    """a - ga - gb - b, always removed afterwards."""
    yield from lab_topology("nfqrole", gateways=True)


@pytest.mark.timeout(90)
def test_gateway_role_file_between_two_sites(sites: Topology, tmp_path: Path) -> None:
    """Both gateways run the gateway role file; the command line names the namespaces' outside link."""
    role = ["--config", str(role_file("gateway"))]
    result = http_transfer(
        sites,
        tmp_path,
        size=SIZE,
        daemon_sides=("ga", "gb"),
        gateway_sides=("ga", "gb"),
        capture_at=("ga", sites.outside["ga"]),
        inside_capture_at=("a", IFNAMES["a"]),
        daemon_args={"ga": role, "gb": role},
    )
    _assert_encrypted(result, ("ga", "gb"))
    _assert_plain_inside(result)
    _assert_clean(sites, result)
