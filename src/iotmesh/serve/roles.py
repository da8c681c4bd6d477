"""Which services each `iotmesh serve` role starts: the same builders as `iotmesh run`.

    role      consumes            produces / serves                 stores
    mqtt      -                   MQTT device API -> telemetry.*    MQTT sessions (own file)
    http      -                   REST + device HTTP API -> telemetry.*   reads the stores
    pipeline  telemetry.> (group pipeline)   decode, validate, rules -> store.*   -
    writer    store.> (group writer)         group commit            time series
    state     -                   owns the state store's schema; singleton jobs (seam)

A device is acknowledged by its transport once the engine stored its message (NATS
JetStream / Redis Streams with persistence): durable, as in `iotmesh run`, where the
acknowledgement waits for the commit. Pipeline workers scale out (the engine's
partition leases give each partition to one worker at a time, so per-device order
holds); the SQLite store keeps its single `writer`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from iotmesh.pipeline import LatestValues
from iotmesh.pipeline.sink import STORE, BusSink
from iotmesh.transports.mqtt import MqttServer
from iotmesh.wiring import AnyHttpServer, Builder

ROLES = ("mqtt", "http", "pipeline", "writer", "state")
WRITER_GROUP = "writer"


@dataclasses.dataclass
class Endpoints:
    """What a role listens on (besides the health listener every process has)."""

    http: AnyHttpServer | None = None
    mqtt: MqttServer | None = None


def _no_cache() -> LatestValues:
    # Another process commits: a cache here would never see those commits, so every
    # read goes to the store (the store keeps latest values in the commit's transaction).
    return LatestValues(max_devices=0)


async def start_role(role: str, build: Builder, admin_token: Callable[[], str]) -> Endpoints:
    """Start the services of `role` in dependency order; the builder's stack stops them.

    `admin_token` is called only by the role that serves the REST API.
    """
    if role == "mqtt":
        return Endpoints(mqtt=await build.mqtt())
    if role == "http":
        ctx = await build.api_context(admin_token(), _no_cache())
        return Endpoints(http=await build.http(ctx))
    if role == "pipeline":
        await build.pipeline(BusSink(await build.bus()), _no_cache())
        return Endpoints()
    if role == "writer":
        writer = await build.writer()
        # Processing happened in the pipeline workers: the writer decodes and commits.
        await build.pipeline(
            writer, _no_cache(), processors=[], pattern=f"{STORE}.>", group=WRITER_GROUP
        )
        return Endpoints()
    if role == "state":
        # Opening the registry creates or upgrades the state schema, before the other
        # services come. Singleton jobs (RPC expiry and retention, connectivity sweeps)
        # belong here once leader election (the cluster package) makes one instance
        # active; today every process holding RPC requests expires its own.
        await build.registry()
        return Endpoints()
    raise ValueError(f"unknown role {role!r}")
