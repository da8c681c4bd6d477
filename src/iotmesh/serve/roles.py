"""Which services each `iotmesh serve` role starts: the same builders as `iotmesh run`.

    role      consumes            produces / serves                 stores
    mqtt      -                   MQTT device API -> telemetry.*    MQTT sessions (own file)
    coap      -                   CoAP device API (UDP, DTLS) -> telemetry.*   -
    http      -                   REST + device HTTP API -> telemetry.*   reads the stores
    pipeline  telemetry.> (group pipeline)   decode, validate, rules -> store.*   -
    writer    store.> (group writer)         group commit (+ retention: SQLite)   time series
    state     -                   owns the state store's schema; retention (not SQLite),
                                  RPC housekeeping                  -

A device is acknowledged by its transport once the engine stored its message (NATS
JetStream / Redis Streams with persistence): durable, as in `iotmesh run`, where the
acknowledgement waits for the commit. Pipeline workers scale out (the engine's
partition leases give each partition to one worker at a time, so per-device order
holds); the SQLite store keeps its single `writer`.

Singleton jobs run under leader election (`Builder.singleton`, lease per job on the
cluster engine): every instance of the role that hosts a job is a candidate, one
leads and runs it, the others stand by and take over within `cluster.lease_s * 4/3`
when it dies (`iotmesh_leader{job}` on /metrics says which one leads).

    job               candidates            fenced by the term's token
    retention         `state` instances     engine fence before each pass; PostgreSQL: also
                      (SQLite time series:  in every delete transaction. InfluxDB and
                      the `writer`)         SQLite: the engine fence only (a pass already
                                            sent runs on)
    rpc_housekeeping  `state` instances     engine fence before each pass; the state store
                                            (SQLite or PostgreSQL): also in every expiry
                                            and purge transaction

Retention (and the rollups it brings up to date) runs in the `writer` when the time
series are in SQLite: the rollup watermarks are cached in the memory of the writer
process that owns the file, so only that process may expire points; that store has a
single writer anyway. InfluxDB and PostgreSQL are shared servers: any `state`
instance can run it, so two `state` instances give it a standby.
RPC housekeeping (`commands/rpc_housekeeping.py`) purges old finished requests and ends
overdue ones that no process holds (a device that never came back); a request that a
process holds is still expired by that process (`commands/rpc.py`), as claims say. Not a
singleton: connectivity, saved by each process for the sessions it holds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from iotmesh.core.settings import Settings
from iotmesh.pipeline import LatestValues
from iotmesh.pipeline.sink import STORE, BusSink
from iotmesh.transports.coap import CoapServer
from iotmesh.transports.mqtt import MqttServer
from iotmesh.wiring import AnyHttpServer, Builder

ROLES = ("mqtt", "coap", "http", "pipeline", "writer", "state")
WRITER_GROUP = "writer"


def retention_role(settings: Settings) -> str:
    """The role whose instances are candidates for the retention job (module docstring)."""
    return "writer" if settings.storage.timeseries == "sqlite" else "state"


@dataclasses.dataclass
class Endpoints:
    """What a role listens on (besides the health listener every process has)."""

    http: AnyHttpServer | None = None
    mqtt: MqttServer | None = None
    coap: CoapServer | None = None


def _no_cache() -> LatestValues:
    # Not committed yet (pipeline workers): nothing may be told to readers from here.
    return LatestValues(max_devices=0)


async def start_role(role: str, build: Builder, admin_token: Callable[[], str]) -> Endpoints:
    """Start the services of `role` in dependency order; the builder's stack stops them.

    `admin_token` is called only by the role that serves the REST API. Latest values:
    with `storage.latest = "redis"` the writer updates them there after each commit
    and `http` reads them; otherwise nothing is cached (another process commits, so a
    cache here would never see it) and reads go to the store, which keeps latest values
    in the commit's transaction.
    """
    build.tracing()  # first: its provider flushes after every service stopped
    if role == "mqtt":
        return Endpoints(mqtt=await build.mqtt())
    if role == "coap":
        return Endpoints(coap=await build.coap())
    if role == "http":
        ctx = await build.api_context(admin_token(), await build.latest(cache=False))
        return Endpoints(http=await build.http(ctx))
    if role == "pipeline":
        await build.pipeline(BusSink(await build.bus()), _no_cache())
        return Endpoints()
    if role == "writer":
        writer = await build.writer()
        if retention_role(build.settings) == "writer":
            await build.retention()
        # Processing happened in the pipeline workers: the writer decodes and commits.
        latest = await build.latest(cache=False)
        await build.pipeline(
            writer, latest, processors=[], pattern=f"{STORE}.>", group=WRITER_GROUP
        )
        return Endpoints()
    if role == "state":
        # Opening the registry creates or upgrades the state schema, before the other
        # services come; then the singleton jobs this role hosts (module docstring).
        await build.registry()
        if retention_role(build.settings) == "state":
            await build.retention()
        await build.rpc_housekeeping()
        return Endpoints()
    raise ValueError(f"unknown role {role!r}")
