"""`iotmesh doctor`: check that the backends the settings name are there, and say what it found.

It reads the settings exactly as `iotmesh run` would (same file, environment and flags),
then checks each backend without changing anything: the data dir (SQLite files) and,
when telemetry goes to InfluxDB, that the server answers, its version, and whether the
database (or bucket) exists. One line per check; exit code 0 when every check passed,
1 when one failed, 2 when the settings themselves are invalid.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from iotmesh.cli.storage_options import (
    InfluxBucketOpt,
    InfluxDatabaseOpt,
    InfluxOrgOpt,
    InfluxUrlOpt,
    InfluxUserOpt,
    InfluxVersionOpt,
    StorageOpt,
    storage_overrides,
)
from iotmesh.core.errors import ConfigError, StorageError
from iotmesh.core.settings import InfluxSettings, Settings, load_settings


@dataclass(frozen=True)
class Check:
    """The outcome of one check."""

    name: str
    ok: bool
    detail: str


def check_data_dir(path: Path) -> Check:
    """The data dir holds the SQLite files: it must exist and be writable, or be creatable."""
    if path.is_dir():
        if os.access(path, os.W_OK | os.X_OK):
            return Check("data dir", True, f"{path} (writable)")
        return Check("data dir", False, f"{path} is not writable")
    if path.exists():
        return Check("data dir", False, f"{path} is not a directory")
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and os.access(parent, os.W_OK | os.X_OK):
        return Check("data dir", True, f"{path} (does not exist yet; run creates it)")
    return Check("data dir", False, f"{path} does not exist and cannot be created")


def check_sqlite_file(name: str, path: Path) -> Check:
    if path.exists():
        return Check(name, True, f"SQLite {path} ({path.stat().st_size} bytes)")
    return Check(name, True, f"SQLite {path} (not created yet)")


async def check_influx(settings: InfluxSettings) -> Check:
    """Ping the InfluxDB server and look for the database (or bucket)."""
    from iotmesh.storage.influx import InfluxClient

    where = settings.database if settings.version == 1 else settings.bucket
    noun = "database" if settings.version == 1 else "bucket"
    try:
        async with InfluxClient(settings) as client:
            info = await client.ping()
            found = f"InfluxDB {info.version} ({info.build}) at {settings.url}"
            try:
                databases = await client.databases()
            except StorageError as exc:
                return Check("timeseries", False, f"{found}; cannot list databases: {exc}")
    except StorageError as exc:
        return Check("timeseries", False, str(exc))
    if where in databases:
        return Check("timeseries", True, f'{found}; {noun} "{where}" exists')
    if settings.version == 1:
        return Check(
            "timeseries", True, f'{found}; database "{where}" does not exist yet (run creates it)'
        )
    return Check("timeseries", False, f'{found}; bucket "{where}" not found')


async def run_checks(settings: Settings) -> list[Check]:
    """Every check the settings call for, in order."""
    data_dir = settings.data_dir
    checks = [check_data_dir(data_dir)]
    checks.append(check_sqlite_file("state", data_dir / "state.db"))
    if settings.storage.timeseries == "influxdb":
        checks.append(await check_influx(settings.storage.influxdb))
    else:
        checks.append(check_sqlite_file("timeseries", data_dir / "timeseries.db"))
    return checks


def doctor(
    config: Annotated[Path | None, typer.Option(help="TOML settings file.")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Data directory (SQLite files).")] = None,
    storage: StorageOpt = None,
    influx_url: InfluxUrlOpt = None,
    influx_version: InfluxVersionOpt = None,
    influx_database: InfluxDatabaseOpt = None,
    influx_username: InfluxUserOpt = None,
    influx_org: InfluxOrgOpt = None,
    influx_bucket: InfluxBucketOpt = None,
) -> None:
    """Check that the configured storage backends are reachable; print what was found."""
    overrides = {
        "data_dir": data_dir,
        **storage_overrides(
            storage,
            influx_url,
            influx_version,
            influx_database,
            influx_username,
            influx_org,
            influx_bucket,
        ),
    }
    try:
        settings = load_settings(config, overrides)
    except ConfigError as exc:
        print(f"FAIL  settings    {exc}")
        raise typer.Exit(2) from None
    print(f"ok    settings    timeseries={settings.storage.timeseries}")
    checks = asyncio.run(run_checks(settings))
    for check in checks:
        print(f"{'ok' if check.ok else 'FAIL':<5} {check.name:<11} {check.detail}")
    if not all(c.ok for c in checks):
        raise typer.Exit(1)
