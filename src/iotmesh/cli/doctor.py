"""`iotmesh doctor`: check that the backends the settings name are there, and say what it found.

It reads the settings exactly as `iotmesh run` would (same file, environment and flags),
then checks each backend without changing anything: the data dir (SQLite files); when
telemetry goes to InfluxDB, that the server answers, its version, and whether the
database (or bucket) exists; for stores on PostgreSQL, that it answers, its version,
whether TimescaleDB is there, and the schema version of each store. One line per check;
exit code 0 when every check passed, 1 when one failed, 2 when the settings themselves
are invalid.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
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
    PostgresSchemaOpt,
    PostgresUrlOpt,
    StateOpt,
    StorageOpt,
    storage_overrides,
)
from iotmesh.core.errors import ConfigError, StorageError
from iotmesh.core.settings import InfluxSettings, PostgresSettings, Settings, load_settings


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


async def check_postgres(settings: PostgresSettings, components: Sequence[str]) -> list[Check]:
    """Connect to PostgreSQL; report its version, TimescaleDB, and the schema version
    of each component ("timeseries", "state") stored there."""
    import asyncpg

    from iotmesh.storage.postgres import state, tsschema
    from iotmesh.storage.postgres.connection import CAUGHT, schema_version, server_facts, where

    known = {tsschema.COMPONENT: 1, state.COMPONENT: len(state.MIGRATIONS)}
    password = settings.password.get_secret_value() if settings.password else None
    try:
        conn = await asyncpg.connect(
            settings.url,
            password=password,
            timeout=settings.timeout_s,
            server_settings={"search_path": settings.schema_name},
        )
        try:
            facts = await server_facts(conn)
            versions = {c: await schema_version(conn, c) for c in components}
        finally:
            await conn.close()
    except CAUGHT as exc:
        detail = f"PostgreSQL at {where(settings)} unreachable or refused: {exc}"
        return [Check(c, False, detail) for c in components]
    if facts["timescaledb_version"] is not None:
        timescale = f"TimescaleDB {facts['timescaledb_version']} installed"
    elif facts["timescaledb_available"]:
        timescale = "TimescaleDB available (not installed in this database)"
    else:
        timescale = "TimescaleDB not available (plain partitions)"
    found = f"PostgreSQL {facts['version']} at {where(settings)}; {timescale}"
    checks = []
    for component in components:
        version = versions[component]
        schema = f'schema "{settings.schema_name}"'
        if version is None:
            checks.append(
                Check(component, True, f"{found}; {schema} not created yet (run creates it)")
            )
        elif version > known[component]:
            checks.append(
                Check(
                    component,
                    False,
                    f"{found}; {schema} has {component} schema {version}, newer than this"
                    f" release knows ({known[component]})",
                )
            )
        else:
            checks.append(
                Check(component, True, f"{found}; {schema} at {component} schema {version}")
            )
    return checks


async def run_checks(settings: Settings) -> list[Check]:
    """Every check the settings call for, in order."""
    data_dir = settings.data_dir
    storage = settings.storage
    checks = [check_data_dir(data_dir)]
    on_postgres = [c for c in ("state", "timeseries") if getattr(storage, c) == "postgres"]
    if storage.state == "sqlite":
        checks.append(check_sqlite_file("state", data_dir / "state.db"))
    if storage.timeseries == "influxdb":
        checks.append(await check_influx(storage.influxdb))
    elif storage.timeseries == "sqlite":
        checks.append(check_sqlite_file("timeseries", data_dir / "timeseries.db"))
    if on_postgres:
        checks.extend(await check_postgres(storage.postgres, on_postgres))
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
    state: StateOpt = None,
    postgres_url: PostgresUrlOpt = None,
    postgres_schema: PostgresSchemaOpt = None,
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
            state,
            postgres_url,
            postgres_schema,
        ),
    }
    try:
        settings = load_settings(config, overrides)
    except ConfigError as exc:
        print(f"FAIL  settings    {exc}")
        raise typer.Exit(2) from None
    print(
        f"ok    settings    timeseries={settings.storage.timeseries} state={settings.storage.state}"
    )
    checks = asyncio.run(run_checks(settings))
    for check in checks:
        print(f"{'ok' if check.ok else 'FAIL':<5} {check.name:<11} {check.detail}")
    if not all(c.ok for c in checks):
        raise typer.Exit(1)
