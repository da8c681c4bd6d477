"""The one place that builds each service from `Settings`, for `run` and `serve` alike.

`iotmesh run` (app.Platform) asks a `Builder` for every service; each `iotmesh serve
SERVICE` process (serve/roles.py) asks it for the few its role needs. A service is built
once, after what it depends on, and entered into the caller's `AsyncExitStack` as it is
built, so it stops in the reverse order: device traffic first, the store last. Besides
`cli`, this module is the only one that picks implementations (bus engine, time-series
backend, HTTP server software).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from iotmesh.api import ApiContext, create_asgi_app
from iotmesh.bus import Bus, make_bus
from iotmesh.bus.memory import MemoryBus
from iotmesh.commands import RpcService
from iotmesh.core.lifecycle import Health, Service
from iotmesh.core.settings import HttpSettings, Settings
from iotmesh.devicestate import AttributeService, ConnectivityService
from iotmesh.pipeline import LatestValues, Pipeline
from iotmesh.pipeline.ingest import TelemetryIngest
from iotmesh.pipeline.sink import Sink
from iotmesh.pipeline.stages import Processor, make_cpu_work, make_validator
from iotmesh.registry import DeviceRegistry
from iotmesh.storage.sqlite.sessions import FILE_NAME as SESSIONS_FILE
from iotmesh.storage.sqlite.sessions import SqliteSessionStore
from iotmesh.storage.sqlite.state import SqliteStateStore
from iotmesh.storage.sqlite.tsdb import SqliteTimeSeriesStore
from iotmesh.storage.timeseries import TimeSeriesStore
from iotmesh.storage.writer import BatchWriter
from iotmesh.transports.http import HttpServer
from iotmesh.transports.http_granian import GranianHttpServer
from iotmesh.transports.mqtt import MqttServer

S = TypeVar("S", bound=Service)
AnyHttpServer = HttpServer | GranianHttpServer


def timeseries_store(settings: Settings, data_dir: Path) -> TimeSeriesStore:
    """The time-series store `storage.timeseries` names (unopened)."""
    if settings.storage.timeseries == "influxdb":
        # Imported only when chosen: the embedded default needs no InfluxDB client.
        from iotmesh.storage.influx import InfluxTimeSeriesStore

        return InfluxTimeSeriesStore(settings.storage.influxdb)
    return SqliteTimeSeriesStore(data_dir / "timeseries.db", settings.storage.sqlite)


class _StoreService(Service):
    """Gives a time-series store the service lifecycle."""

    name = "timeseries"

    def __init__(self, store: TimeSeriesStore) -> None:
        self.store = store

    async def start(self) -> None:
        await self.store.open()

    async def stop(self) -> None:
        await self.store.close()


class _BusService(Service):
    """Gives a bus the service lifecycle (and, in-process, its queue depth as health)."""

    name = "bus"

    def __init__(self, bus: Bus) -> None:
        self.bus = bus

    async def start(self) -> None:
        await self.bus.start()

    async def stop(self) -> None:
        await self.bus.stop()

    def health(self) -> Health:
        if isinstance(self.bus, MemoryBus):
            return Health(ok=True, detail=f"{self.bus.depth()} messages queued")
        return Health(ok=True, detail=self.bus.__class__.__name__)

    def stats(self) -> dict[str, Any]:
        return {"queued": self.bus.depth()} if isinstance(self.bus, MemoryBus) else {}


class Builder:
    """Builds, starts and remembers the services of one process.

    Args:
        settings: the process settings.
        data_dir: the (shared) data directory: state.db, timeseries.db, admin_token.
        stack: where each started service is entered (closing it stops them all).
        instance_dir: where files private to this process go (MQTT sessions); the data
            dir itself for `iotmesh run`, `instances/<service>-<id>/` for `serve`.
    """

    def __init__(
        self,
        settings: Settings,
        data_dir: Path,
        stack: contextlib.AsyncExitStack,
        instance_dir: Path | None = None,
    ) -> None:
        self.settings = settings
        self.data_dir = data_dir
        self.instance_dir = instance_dir if instance_dir is not None else data_dir
        self.services: list[Service] = []
        self._stack = stack
        self._built: dict[str, Any] = {}

    async def enter(self, service: S) -> S:
        """Start `service` now and stop it when the stack closes."""
        await self._stack.enter_async_context(service)
        self.services.append(service)
        return service

    def health(self) -> dict[str, Health]:
        """Each started service's health, by name."""
        return {s.name: s.health() for s in self.services}

    def stats(self) -> dict[str, dict[str, Any]]:
        """Each service's counters, by service name (those that have any)."""
        return {s.name: stats for s in self.services if (stats := s.stats())}

    # -- state ----------------------------------------------------------------------------

    async def registry(self) -> DeviceRegistry:
        """The device registry; starting it opens (and migrates) the state store."""
        if "registry" not in self._built:
            sync = self.settings.storage.sqlite.synchronous
            state = SqliteStateStore(self.data_dir / "state.db", sync)
            self._built["state"] = state
            self._built["registry"] = await self.enter(DeviceRegistry(state))
        registry: DeviceRegistry = self._built["registry"]
        return registry

    async def _state(self) -> SqliteStateStore:
        await self.registry()
        state: SqliteStateStore = self._built["state"]
        return state

    async def attributes(self) -> AttributeService:
        if "attributes" not in self._built:
            service = AttributeService(await self._state())
            self._built["attributes"] = await self.enter(service)
        attributes: AttributeService = self._built["attributes"]
        return attributes

    async def rpc(self) -> RpcService:
        if "rpc" not in self._built:
            service = RpcService(await self._state(), self.settings.devices)
            self._built["rpc"] = await self.enter(service)
        rpc: RpcService = self._built["rpc"]
        return rpc

    async def connectivity(self) -> ConnectivityService:
        if "connectivity" not in self._built:
            timeout = self.settings.devices.inactivity_timeout_s
            service = ConnectivityService(timeout, store=await self._state())
            self._built["connectivity"] = await self.enter(service)
        connectivity: ConnectivityService = self._built["connectivity"]
        return connectivity

    # -- telemetry ------------------------------------------------------------------------

    async def timeseries(self) -> TimeSeriesStore:
        if "timeseries" not in self._built:
            store = timeseries_store(self.settings, self.data_dir)
            await self.enter(_StoreService(store))
            self._built["timeseries"] = store
        store_: TimeSeriesStore = self._built["timeseries"]
        return store_

    async def writer(self) -> BatchWriter:
        if "writer" not in self._built:
            writer = BatchWriter(await self.timeseries(), self.settings.writer)
            self._built["writer"] = await self.enter(writer)
        writer_: BatchWriter = self._built["writer"]
        return writer_

    async def bus(self) -> Bus:
        """The bus `bus.backend` names, started."""
        if "bus" not in self._built:
            bus = make_bus(self.settings.bus)
            await self.enter(_BusService(bus))
            self._built["bus"] = bus
        bus_: Bus = self._built["bus"]
        return bus_

    def processors(self) -> list[Processor]:
        """The pipeline's per-message stages, as settings configure them."""
        stages = [make_validator()]
        if self.settings.pipeline.cpu_work_us > 0:
            stages.append(make_cpu_work(self.settings.pipeline.cpu_work_us))
        return stages

    async def pipeline(
        self,
        sink: BatchWriter | Sink,
        latest: LatestValues,
        processors: list[Processor] | None = None,
        **consume: str,
    ) -> Pipeline:
        """A pipeline consuming the bus into `sink` (`consume`: pattern, group)."""
        stages = self.processors() if processors is None else processors
        return await self.enter(Pipeline(await self.bus(), sink, latest, stages, **consume))

    # -- device-facing --------------------------------------------------------------------

    async def mqtt(self) -> MqttServer:
        """The MQTT server, publishing telemetry to the bus (it waits for room: slow
        acks, not errors)."""
        sync = self.settings.storage.sqlite.synchronous
        server = MqttServer(
            self.settings.host,
            self.settings.mqtt,
            await self.registry(),
            TelemetryIngest(await self.bus(), None),
            await self.attributes(),
            await self.rpc(),
            sessions=SqliteSessionStore(self.instance_dir / SESSIONS_FILE, sync),
            connectivity=await self.connectivity(),
        )
        return await self.enter(server)

    async def api_context(
        self,
        admin_token: str,
        latest: LatestValues,
        health: Callable[[], dict[str, Health]] | None = None,
        stats: Callable[[], dict[str, dict[str, Any]]] | None = None,
    ) -> ApiContext:
        """What the REST and device HTTP API need, built from the services."""
        return ApiContext(
            settings=self.settings,
            admin_token=admin_token,
            registry=await self.registry(),
            attributes=await self.attributes(),
            rpc=await self.rpc(),
            connectivity=await self.connectivity(),
            timeseries=await self.timeseries(),
            latest=latest,
            ingest=TelemetryIngest(await self.bus(), self.settings.http.enqueue_timeout_s),
            health=health or self.health,
            stats=stats or self.stats,
        )

    async def http(self, ctx: ApiContext) -> AnyHttpServer:
        """The HTTP server of the REST and device HTTP API."""
        return await self.serve_asgi(
            create_asgi_app(ctx),
            self.settings.http,
            stats=ctx.long_polls.stats,
            before_stop=ctx.long_polls.close,
        )

    async def serve_asgi(
        self,
        app: Any,
        settings: HttpSettings,
        stats: Callable[[], dict[str, Any]] | None = None,
        before_stop: Callable[[], None] | None = None,
    ) -> AnyHttpServer:
        """Serve an ASGI app with the HTTP server software `http.server` names."""
        server_class = GranianHttpServer if settings.server == "granian" else HttpServer
        server = server_class(
            app, self.settings.host, settings, stats=stats, before_stop=before_stop
        )
        return await self.enter(server)
