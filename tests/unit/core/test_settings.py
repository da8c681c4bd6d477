"""Settings precedence: defaults < TOML file < environment < CLI flags."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from iotmesh.core.errors import ConfigError
from iotmesh.core.settings import load_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("IOTMESH_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def test_defaults() -> None:
    settings = load_settings()
    assert settings.http.port == 8080
    assert settings.host == "127.0.0.1"
    assert settings.storage.sqlite.synchronous == "FULL"


def test_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "custom.toml"
    config.write_text('log_level = "debug"\n[http]\nport = 1111\n[bus]\npartitions = 3\n')
    from_file = load_settings(config)
    assert (from_file.http.port, from_file.bus.partitions, from_file.log_level) == (
        1111,
        3,
        "debug",
    )

    monkeypatch.setenv("IOTMESH_HTTP__PORT", "2222")
    from_env = load_settings(config)
    assert from_env.http.port == 2222
    assert from_env.bus.partitions == 3

    from_cli = load_settings(config, {"http.port": 3333, "host": None})
    assert from_cli.http.port == 3333
    assert from_cli.host == "127.0.0.1"


def test_default_file_in_working_directory(tmp_path: Path) -> None:
    (tmp_path / "iotmesh.toml").write_text("[writer]\nmax_batch_records = 7\n")
    assert load_settings().writer.max_batch_records == 7


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[http]\nport = -1\n", "http.port"),
        ("[http]\nprot = 1\n", "http.prot"),
        ("nonsense = 1\n", "nonsense"),
        ("[storage]\ntimeseries = 'cassandra'\n", "storage.timeseries"),
        ("[http\n", "not valid TOML"),
    ],
)
def test_invalid_settings_name_the_key(tmp_path: Path, toml: str, message: str) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(toml)
    with pytest.raises(ConfigError, match=message):
        load_settings(config)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(tmp_path / "nope.toml")


def test_admin_token_is_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IOTMESH_ADMIN_TOKEN", "s3cret")
    settings = load_settings()
    assert settings.admin_token is not None
    assert settings.admin_token.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(settings)
