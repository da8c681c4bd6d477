"""The storage flags `iotmesh run` and `iotmesh doctor` share (CLI flags > env > file).

Secrets (the InfluxDB 1.x password, the 2.x token, the PostgreSQL password) have no
flag, as a command line is visible to every user of the machine: set them in the TOML
file or as IOTMESH_STORAGE__INFLUXDB__* / IOTMESH_STORAGE__POSTGRES__PASSWORD.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

StorageOpt = Annotated[
    str | None,
    typer.Option(
        "--storage", help="Time-series backend: sqlite, influxdb or postgres.", show_default=False
    ),
]
StateOpt = Annotated[
    str | None,
    typer.Option("--state", help="State backend: sqlite or postgres.", show_default=False),
]
PostgresUrlOpt = Annotated[
    str | None,
    typer.Option(
        "--postgres-url",
        help="PostgreSQL URL (postgresql://user@host:5432/database).",
        show_default=False,
    ),
]
PostgresSchemaOpt = Annotated[
    str | None,
    typer.Option("--postgres-schema", help="PostgreSQL schema of the tables.", show_default=False),
]
InfluxUrlOpt = Annotated[
    str | None,
    typer.Option("--influx-url", help="InfluxDB URL (http://host:8086).", show_default=False),
]
InfluxVersionOpt = Annotated[
    int | None,
    typer.Option("--influx-version", help="InfluxDB API: 1, or 2 for 2.x/3.x.", show_default=False),
]
InfluxDatabaseOpt = Annotated[
    str | None,
    typer.Option("--influx-database", help="InfluxDB 1.x database.", show_default=False),
]
InfluxUserOpt = Annotated[
    str | None,
    typer.Option("--influx-username", help="InfluxDB 1.x user name.", show_default=False),
]
InfluxOrgOpt = Annotated[
    str | None, typer.Option("--influx-org", help="InfluxDB 2.x organization.", show_default=False)
]
InfluxBucketOpt = Annotated[
    str | None,
    typer.Option("--influx-bucket", help="InfluxDB 2.x/3.x bucket.", show_default=False),
]


def storage_overrides(
    storage: str | None,
    influx_url: str | None,
    influx_version: int | None,
    influx_database: str | None,
    influx_username: str | None,
    influx_org: str | None,
    influx_bucket: str | None,
    state: str | None = None,
    postgres_url: str | None = None,
    postgres_schema: str | None = None,
) -> dict[str, Any]:
    """The settings overrides (dotted keys) of the storage flags; None: flag not given."""
    prefix = "storage.influxdb."
    return {
        "storage.state": state,
        "storage.postgres.url": postgres_url,
        "storage.postgres.schema_name": postgres_schema,
        "storage.timeseries": storage,
        prefix + "url": influx_url,
        prefix + "version": influx_version,
        prefix + "database": influx_database,
        prefix + "username": influx_username,
        prefix + "org": influx_org,
        prefix + "bucket": influx_bucket,
    }
