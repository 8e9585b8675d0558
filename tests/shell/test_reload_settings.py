"""Units of the settings for workers, the metrics file and SIGHUP reloads (shell/settings.py)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from nfq_tcpcrypt.core.errors import ConfigError
from nfq_tcpcrypt.shell import settings


def test_workers_and_metrics_file_keys() -> None:
    values = settings.parse_file_text('workers = 3\nmetrics-file = "/var/lib/nfq-tcpcrypt/m.prom"\n')
    options = settings.options_from(values, {})
    assert options.workers == 3 and options.metrics_file == "/var/lib/nfq-tcpcrypt/m.prom"
    assert settings.options_from(values, {"workers": 2}).workers == 2  # the command line wins
    with pytest.raises(ConfigError, match="workers"):
        settings.options_from({"workers": 0}, {})
    with pytest.raises(ConfigError, match="workers"):
        settings.options_from({"workers": 65}, {})


def test_default_workers() -> None:
    host = settings.options_from({}, {})
    assert settings.worker_count(host) == 1
    gateway = settings.DaemonOptions(mode="gateway", outside=("eth0",))
    assert 1 <= settings.worker_count(gateway) <= 64


def test_reload_takes_new_lists_and_keeps_what_needs_a_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "c.toml"
    path.write_text('tep = "x25519"\nqueue-num = 7200\n')
    options = settings.options_from(settings.load_file(str(path)), {"aead": "chacha20poly1305"})
    options.config_file, options.cli = str(path), {"aead": "chacha20poly1305"}
    path.write_text(
        'tep = "p256,x25519"\naead = "aes256gcm"\nqueue-num = 7300\n[[policy]]\nport = 22\nno_resume = true\n'
    )
    with caplog.at_level(logging.WARNING):
        fresh = settings.reload_options(options)
    assert fresh.teps == "p256,x25519"
    assert fresh.aeads == "chacha20poly1305"  # still the command line's
    assert len(fresh.engine["policies"]) == 1
    assert fresh.queue_num == 7200 and "queue_num" in caplog.text  # needs a restart: kept, and said
    assert fresh.config_file == str(path)
    path.write_text("tep = 5\n")
    with pytest.raises(ConfigError):
        settings.reload_options(options)


@pytest.mark.parametrize(
    ("text", "cpus"),
    [("0", (0,)), ("3,1", (3, 1)), ("0,2-4", (0, 2, 3, 4)), (" 1 , 0-1 ", (1, 0)), ("4095", (4095,))],
)
def test_cpus_lists(text: str, cpus: tuple[int, ...]) -> None:
    """CPU numbers and ranges in the order given (worker k gets the k-th), each once."""
    assert settings.options_from({}, {"cpus": text}).cpus == cpus


@pytest.mark.parametrize("text", ["", "a", "1,", "-1", "2-1", "1-", "1-2-3", "0x1", "²", "4096", "0-99999999999"])
def test_cpus_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="cpus"):
        settings.options_from({}, {"cpus": text})


def test_cpus_in_the_file() -> None:
    """A TOML array of numbers or a string; anything else names the key."""
    assert settings.options_from(settings.parse_file_text("cpus = [2, 0]\n"), {}).cpus == (2, 0)
    assert settings.options_from(settings.parse_file_text('cpus = "0-1"\n'), {}).cpus == (0, 1)
    assert settings.options_from(settings.parse_file_text("cpus = [2]\n"), {"cpus": "1"}).cpus == (1,)
    for text in ("cpus = 1\n", "cpus = [true]\n", 'cpus = ["0"]\n'):
        with pytest.raises(ConfigError, match="cpus"):
            settings.parse_file_text(text)


def test_cpus_must_be_available_and_set_the_gateway_default_workers() -> None:
    allowed = sorted(os.sched_getaffinity(0))
    options = settings.options_from({}, {"cpus": str(allowed[-1])})
    settings.resolve_system(options)  # available: accepted
    outside = settings.options_from({}, {"cpus": f"{allowed[-1] + 1},{allowed[0]}"})
    with pytest.raises(ConfigError, match=rf"cpus: {allowed[-1] + 1} not available here \(this process may run on "):
        settings.resolve_system(outside)
    gateway = settings.options_from({}, {"mode": "gateway", "outside": "eth0", "cpus": "0-2"})
    assert settings.worker_count(gateway) == 3
    assert settings.worker_count(settings.options_from({}, {"cpus": "0-2"})) == 1  # host mode: one process


def test_reload_keeps_the_cpus(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cpu = min(os.sched_getaffinity(0))
    path = tmp_path / "c.toml"
    path.write_text(f"cpus = [{cpu}]\n")
    options = settings.options_from(settings.load_file(str(path)), {})
    options.config_file = str(path)
    path.write_text("")
    with caplog.at_level(logging.WARNING):
        fresh = settings.reload_options(options)
    assert fresh.cpus == (cpu,) and "cpus changed" in caplog.text
