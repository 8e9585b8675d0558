"""Units of the settings for workers, the metrics file and SIGHUP reloads (shell/settings.py)."""

from __future__ import annotations

import logging
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
