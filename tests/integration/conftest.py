"""Integration fixtures: root, network namespaces, iptables and NFQUEUE, or a clean skip.

Every test here is marked `netns`. The topology fixture always deletes its namespaces (and kills the
processes it started in them), pass or fail; nothing outside the namespaces is configured.

Every test runs once per queue backend (test ids end in `[netfilterqueue]` or `[fast]`): the
`queue_backend` fixture sets NFQ_TCPCRYPT_QUEUE_BACKEND, which `lab.net.start_daemon` and
`lab.net.backend_args` turn into `--queue-backend`. `pytest --queue-backend fast` (repeatable) runs
only the named ones; NFQ_TCPCRYPT_QUEUE_BACKEND set outside pytest narrows the same way.
A test marked `own_backend` chooses its backends itself and runs once.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest

from nfq_tcpcrypt.lab import net as labnet
from nfq_tcpcrypt.lab.net import QUEUE_BACKEND_ENV, Topology
from nfq_tcpcrypt.shell.settings import QUEUE_BACKENDS, DaemonOptions

TOOLS = ("ip", "iptables-restore", "iptables-save", "tcpdump", "curl")
_PROBE = (
    "from netfilterqueue import NetfilterQueue as Q\n"
    "q = Q(); q.bind(65000, lambda p: p.accept(), sock_len=131072); q.unbind()\n"
)


@functools.cache
def _unusable_reason() -> str | None:
    """Why the integration tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return f"missing tools: {', '.join(missing)}"
    try:
        import netfilterqueue  # noqa: F401
    except ImportError as exc:
        return f"NetfilterQueue not importable: {exc}"
    try:
        with Topology("nfqprobe") as topo:
            bind = topo.run("a", [sys.executable, "-c", _PROBE], timeout=30)
            if bind.returncode != 0:
                return f"cannot bind an NFQUEUE in a netns: {bind.stderr.strip()[-300:]}"
            rules = topo.run(
                "a",
                ["iptables-restore", "--noflush"],
                input="*mangle\n-A POSTROUTING -p tcp -j NFQUEUE --queue-num 65000 --queue-bypass\nCOMMIT\n",
                timeout=30,
            )
            if rules.returncode != 0:
                return f"iptables NFQUEUE target unusable: {rules.stderr.strip()[-300:]}"
    except (OSError, subprocess.SubprocessError) as exc:
        return f"network namespaces unusable: {exc}"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test of this directory `netns`."""
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.netns)


def selected_backends(config: pytest.Config) -> list[str]:
    """The backends to run on: `--queue-backend` options, else NFQ_TCPCRYPT_QUEUE_BACKEND, else all
    (the daemon's default first)."""
    chosen: list[str] | None = config.getoption("queue_backends", None)
    if chosen:
        return list(dict.fromkeys(chosen))
    if env := os.environ.get(QUEUE_BACKEND_ENV):
        return [env]
    default = DaemonOptions.queue_backend
    return [default, *(backend for backend in QUEUE_BACKENDS if backend != default)]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """One test per selected backend, except tests marked `own_backend`."""
    if "queue_backend" in metafunc.fixturenames and metafunc.definition.get_closest_marker("own_backend") is None:
        metafunc.parametrize("queue_backend", selected_backends(metafunc.config), indirect=True)


@pytest.fixture(autouse=True)
def queue_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str | None:
    """The backend every daemon of this test runs on (None: a test that picks its own)."""
    backend: str | None = getattr(request, "param", None)
    if backend is None:
        monkeypatch.delenv(QUEUE_BACKEND_ENV, raising=False)
    else:
        monkeypatch.setenv(QUEUE_BACKEND_ENV, backend)
    return backend


@pytest.fixture(autouse=True)
def no_failed_injections() -> Iterator[None]:
    """Every daemon a test started must end with zero failed injections (an oversized or otherwise
    refused packet is a lost packet). Set up before the topology fixtures, so this runs after they
    stopped the daemons."""
    labnet.STARTED.clear()
    yield
    failed = {f"{d.side} ({d.log})": n for d in labnet.STARTED if (n := labnet.failed_injections(d))}
    labnet.STARTED.clear()
    assert not failed, f"failed injections: {failed}"


def lab_topology(tag: str, **shape: int) -> Iterator[Topology]:
    """Body of every topology fixture: skip (or, with NFQ_TCPCRYPT_REQUIRE_NETNS=1 as in CI, fail)
    when namespaces, iptables or NFQUEUE are unusable; else build the shape and always remove it."""
    reason = _unusable_reason()
    if reason is not None:
        if os.environ.get("NFQ_TCPCRYPT_REQUIRE_NETNS") == "1":
            pytest.fail(f"integration environment required but unusable: {reason}")
        pytest.skip(reason)
    with Topology(tag, **shape) as topology:
        yield topology


@pytest.fixture
def topo() -> Iterator[Topology]:
    """A fresh two-namespace topology, always removed afterwards."""
    yield from lab_topology("nfqtest")


@pytest.fixture
def routed() -> Iterator[Topology]:
    """A fresh a - r - b topology, always removed afterwards."""
    yield from lab_topology("nfqnet", router=True)
