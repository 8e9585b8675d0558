"""The suite's one command-line option: which queue backends the integration tests run on
(tests/integration/conftest.py parametrizes every daemon-starting test by it; README: Queue backends)."""

from __future__ import annotations

import pytest

from nfq_tcpcrypt.shell.settings import QUEUE_BACKENDS


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--queue-backend",
        action="append",
        choices=QUEUE_BACKENDS,
        dest="queue_backends",
        help="run the integration tests on this queue backend only (repeatable; default: every backend)",
    )
