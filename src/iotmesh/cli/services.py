"""`iotmesh services`: what is registered in the cluster, whether it is alive, and where.

Reads the registry of the engine the settings name (`cluster.backend`, unset: the
bus's engine if it is NATS or Redis, as `iotmesh serve` registers; its url,
`cluster.namespace`), once. A one-shot reader has seen no heartbeat arrive, so phi is
computed as a discovery client that had seen regular heartbeats at the instance's own
interval would compute it, from the age of the last one (the instance's wall clock:
keep clocks in sync). Instances whose phi reached `cluster.phi_threshold` are failed
and left out unless `--all`; the engine deletes their record after `cluster.ttl_s`.
Past half the threshold an instance is shown as suspect (still in rotation).

Exit codes: 0 listed (possibly nothing), 1 the engine cannot be read, 2 bad settings.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.console import Console
from rich.table import Table

from iotmesh.cluster import ClusterError, Instance, make_backend
from iotmesh.cluster.backend import cluster_engine
from iotmesh.cluster.discovery import make_detector
from iotmesh.cluster.phi import verdict
from iotmesh.core.clock import now_ms
from iotmesh.core.errors import ConfigError
from iotmesh.core.settings import ClusterSettings, Settings, load_settings


def describe(instance: Instance, settings: ClusterSettings, now: int) -> dict[str, Any]:
    """One row: the record plus heartbeat age, phi and whether it counts as alive."""
    age = max(0.0, (now - instance.heartbeat_ms) / 1000)
    detector = make_detector(settings, instance.interval_s)
    detector.heartbeat(0.0)
    phi = detector.phi(age)
    return {
        "service": instance.service,
        "instance": instance.instance_id,
        "addresses": instance.addresses,
        "version": instance.version,
        "health": instance.health,
        "load": instance.load,
        "started_ms": instance.started_ms,
        "heartbeat_age_s": round(age, 3),
        "phi": round(phi, 2),
        "alive": phi < settings.phi_threshold,
        "state": verdict(phi, settings.phi_threshold),
        "metadata": instance.metadata,
    }


async def read_services(settings: Settings, service: str | None) -> list[dict[str, Any]]:
    backend = make_backend(settings)
    await backend.start()
    try:
        found = await backend.list(service)
    finally:
        await backend.stop()
    now = now_ms()
    return [describe(i, settings.cluster, now) for i in found]


def services(
    service: Annotated[str | None, typer.Argument(help="Only this service.")] = None,
    config: Annotated[Path | None, typer.Option(help="TOML settings file.")] = None,
    backend: Annotated[
        str | None,
        typer.Option(help="Cluster engine: redis, nats or kubernetes (cluster.backend)."),
    ] = None,
    namespace: Annotated[
        str | None, typer.Option(help="Cluster namespace (cluster.namespace).")
    ] = None,
    show_all: Annotated[
        bool, typer.Option("--all", help="Also list instances the detector counts as failed.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List the registered instances of every service: alive, healthy, where."""
    err = Console(stderr=True)
    engines: dict[str, Literal["redis", "nats", "kubernetes"]] = {
        "redis": "redis",
        "nats": "nats",
        "kubernetes": "kubernetes",
    }
    chosen = None
    if backend is not None:
        if backend not in engines:
            err.print("[red]iotmesh: --backend is redis, nats or kubernetes[/red]")
            raise typer.Exit(2)
        chosen = engines[backend]
    try:
        settings = load_settings(
            config, {"cluster.backend": chosen, "cluster.namespace": namespace}
        )
    except ConfigError as exc:
        err.print(f"[red]iotmesh: {exc}[/red]")
        raise typer.Exit(2) from None
    try:
        rows = asyncio.run(read_services(settings, service))
    except ClusterError as exc:
        err.print(f"[red]iotmesh: {exc}[/red]")
        raise typer.Exit(1) from None
    if not show_all:
        rows = [r for r in rows if r["alive"]]
    if as_json:
        print(json.dumps(rows))
        return
    out = Console()
    if not out.is_terminal:
        out = Console(width=200)
    table = Table("service", "instance", "address", "version", "health", "load", "age", "phi")
    for r in rows:
        health = r["health"] if r["state"] == "alive" else f"{r['health']} ({r['state']})"
        table.add_row(
            r["service"],
            r["instance"],
            ", ".join(r["addresses"]),
            r["version"],
            health,
            f"{r['load']:g}",
            f"{r['heartbeat_age_s']:.1f}s",
            f"{r['phi']:.1f}",
        )
    out.print(table)
    out.print(f"{len(rows)} instances ({cluster_engine(settings)}, {settings.cluster.namespace})")
