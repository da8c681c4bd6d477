"""Wiring: build the services of the all-in-one process from `Settings` and run them.

This module and `cli` are the only places that choose implementations. Services start
in dependency order and stop in reverse, so a shutdown first stops accepting device
traffic (HTTP), then drains the bus through the pipeline, then flushes the writer, and
only then closes the stores: every message that was accepted is committed or refused,
never half-done. An `AsyncExitStack` gives that order; the services' own tasks run
concurrently beneath it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Collection
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from iotmesh import __version__
from iotmesh.api import ApiContext, create_asgi_app
from iotmesh.bus.memory import MemoryBus
from iotmesh.commands import RpcService
from iotmesh.core.ids import SERVICE_NAME, instance_id
from iotmesh.core.lifecycle import Health, Service
from iotmesh.core.settings import Settings
from iotmesh.core.tracing import INSTRUMENTATION, Tracing, make_provider
from iotmesh.core.tracing import shutdown as shutdown_tracing
from iotmesh.datadir import DataDir
from iotmesh.devicestate import AttributeService, ConnectivityService
from iotmesh.pipeline import LatestCache, LatestValues, Pipeline
from iotmesh.pipeline.ingest import TelemetryIngest
from iotmesh.registry import DeviceRegistry
from iotmesh.storage.retention import DevicesOfTypes, RetentionJob
from iotmesh.storage.sqlite.sessions import FILE_NAME as SESSIONS_FILE
from iotmesh.storage.sqlite.sessions import SqliteSessionStore
from iotmesh.storage.sqlite.state import SqliteStateStore
from iotmesh.storage.sqlite.tsdb import SqliteTimeSeriesStore
from iotmesh.storage.state import StateStore
from iotmesh.storage.timeseries import TimeSeriesStore
from iotmesh.storage.writer import BatchWriter
from iotmesh.transports.coap import CoapServer
from iotmesh.transports.http import HttpServer
from iotmesh.transports.http_granian import GranianHttpServer
from iotmesh.transports.mqtt import MqttServer

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.trace import TracerProvider

    from iotmesh.storage.redis import HotState

log = logging.getLogger(__name__)


def timeseries_store(settings: Settings, data_dir: Path) -> TimeSeriesStore:
    """The time-series store `storage.timeseries` names (unopened)."""
    if settings.storage.timeseries == "influxdb":
        # Imported only when chosen: the embedded default needs no InfluxDB client.
        from iotmesh.storage.influx import InfluxTimeSeriesStore

        return InfluxTimeSeriesStore(settings.storage.influxdb)
    if settings.storage.timeseries == "postgres":
        from iotmesh.storage.postgres import PostgresTimeSeriesStore

        return PostgresTimeSeriesStore(settings.storage.postgres)
    levels = [level.interval_ms for level in settings.storage.retention.rollups]
    return SqliteTimeSeriesStore(data_dir / "timeseries.db", settings.storage.sqlite, levels)


def devices_of_types(registry: DeviceRegistry) -> DevicesOfTypes:
    """The retention job's view of the registry: device ids by type."""

    async def lookup(types: Collection[str]) -> dict[str, list[str]]:
        wanted = set(types)
        out: dict[str, list[str]] = {t: [] for t in wanted}
        page = 0
        while True:
            listing = await registry.list(page, 1000)
            for device in listing.data:
                if device.type in wanted:
                    out[device.type].append(device.id)
            if not listing.has_next:
                return out
            page += 1

    return lookup


def state_store(settings: Settings, data_dir: Path) -> StateStore:
    """The state store `storage.state` names (unopened)."""
    if settings.storage.state == "postgres":
        from iotmesh.storage.postgres import PostgresStateStore

        return PostgresStateStore(settings.storage.postgres)
    return SqliteStateStore(data_dir / "state.db", settings.storage.sqlite.synchronous)


def uses_redis(settings: Settings) -> bool:
    """Whether any hot state is configured to live in Redis (`storage.redis`)."""
    r = settings.storage.redis
    return (
        settings.storage.latest == "redis" or r.connectivity or r.attribute_cache or r.rpc_wakeups
    )


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
    name = "bus"

    def __init__(self, bus: MemoryBus) -> None:
        self.bus = bus

    async def start(self) -> None:
        await self.bus.start()

    async def stop(self) -> None:
        await self.bus.stop()

    def health(self) -> Health:
        return Health(ok=True, detail=f"{self.bus.depth()} messages queued")

    def stats(self) -> dict[str, Any]:
        return {"queued": self.bus.depth()}


class Platform:
    """All services of `iotmesh run` in one process.

    Usage:
        async with Platform(settings) as platform:
            await platform.wait_closed()   # until `shutdown()` or a service fails

    `tracer_provider`: with `tracing.enabled`, spans go to this provider instead of
    the one the settings describe (tests read them with an in-memory exporter);
    `tracing.sample_ratio` still applies.
    """

    def __init__(
        self, settings: Settings, *, tracer_provider: TracerProvider | None = None
    ) -> None:
        self.settings = settings
        self._tracer_provider = tracer_provider
        self._started = False
        self.data_dir = DataDir(settings.data_dir)
        self.admin_token = ""
        self.admin_token_generated = False
        self._stack = contextlib.AsyncExitStack()
        self._services: list[Service] = []
        self._shutdown = asyncio.Event()
        self.http: HttpServer | GranianHttpServer | None = None
        self.mqtt: MqttServer | None = None
        self.coap: CoapServer | None = None

    async def __aenter__(self) -> Self:
        self.data_dir.acquire()
        self._stack.callback(self.data_dir.release)
        try:
            await self._start()
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._shutdown.set()  # /readyz says so while the services stop
        async with asyncio.timeout(self.settings.shutdown_timeout_s):
            await self._stack.aclose()

    async def _enter(self, service: Service) -> None:
        await self._stack.enter_async_context(service)
        self._services.append(service)

    def _tracing(self) -> Tracing | None:
        """The tracer of every service, None when tracing is off (see core/tracing.py)."""
        if not self.settings.tracing.enabled:
            return None
        provider = self._tracer_provider
        if provider is None:
            built = make_provider(
                self.settings.tracing,
                service=SERVICE_NAME,
                version=__version__,
                instance=instance_id(),
            )
            # Sends the spans still batched; runs after every service stopped.
            self._stack.push_async_callback(self._stop_tracing, built)
            provider = built
        tracer = provider.get_tracer(INSTRUMENTATION, __version__)
        return Tracing(tracer, self.settings.tracing.sample_ratio)

    async def _stop_tracing(self, provider: SdkTracerProvider) -> None:
        if not await shutdown_tracing(provider, self.settings.tracing.export_timeout_s):
            log.warning("tracing: the collector did not take the last spans; dropped")

    async def _start(self) -> None:
        settings = self.settings
        path = self.data_dir.path
        tracing = self._tracing()
        tracer = None if tracing is None else tracing.tracer
        if settings.admin_token is not None:
            self.admin_token = settings.admin_token.get_secret_value()
        else:
            self.admin_token, self.admin_token_generated = self.data_dir.admin_token()

        sync = settings.storage.sqlite.synchronous
        hot: HotState | None = None
        if uses_redis(settings):
            # Imported only when chosen, like the other engines.
            from iotmesh.storage.redis import HotState

            hot = HotState(settings.storage.redis)
            await self._enter(hot)
        state = state_store(settings, path)
        registry = DeviceRegistry(state)
        attribute_cache = None
        if hot is not None and settings.storage.redis.attribute_cache:
            from iotmesh.storage.redis import RedisAttributeCache

            attribute_cache = RedisAttributeCache(hot)
        attributes = AttributeService(state, attribute_cache)
        notifier = None
        if hot is not None and settings.storage.redis.rpc_wakeups:
            from iotmesh.commands.wakeups import CLAIM_TTL_S
            from iotmesh.storage.redis import RedisRpcNotifier

            notifier = RedisRpcNotifier(hot, CLAIM_TTL_S)
        rpc = RpcService(state, settings.devices, notifier=notifier)
        mirror = None
        if hot is not None and settings.storage.redis.connectivity:
            from iotmesh.storage.redis import RedisConnectivityMirror

            mirror = RedisConnectivityMirror(hot)
        connectivity = ConnectivityService(
            settings.devices.inactivity_timeout_s,
            store=state,
            mirror=mirror,
            mirror_interval_s=settings.storage.redis.connectivity_flush_s,
        )
        store = timeseries_store(settings, path)
        writer = BatchWriter(store, settings.writer, tracer)
        bus = MemoryBus(settings.bus)
        latest: LatestCache = LatestValues()
        if settings.storage.latest == "redis" and hot is not None:
            from iotmesh.storage.redis import RedisLatestValues

            latest = RedisLatestValues(hot)
        await self._enter(registry)
        await self._enter(attributes)
        await self._enter(rpc)
        await self._enter(connectivity)
        await self._enter(_StoreService(store))
        await self._enter(writer)
        await self._enter(
            RetentionJob(store, settings.storage.retention, devices_of_types(registry))
        )
        await self._enter(_BusService(bus))
        await self._enter(Pipeline(bus, writer, latest, tracer=tracer))

        ingest = TelemetryIngest(bus, settings.http.enqueue_timeout_s, tracing)
        self.mqtt = MqttServer(
            settings.host,
            settings.mqtt,
            registry,
            TelemetryIngest(bus, None, tracing),  # MQTT waits for room: slow acks, not errors
            attributes,
            rpc,
            sessions=SqliteSessionStore(path / SESSIONS_FILE, sync),
            connectivity=connectivity,
        )
        await self._enter(self.mqtt)
        if settings.coap.enabled:
            self.coap = CoapServer(
                settings.host,
                settings.coap,
                registry,
                TelemetryIngest(bus, settings.coap.enqueue_timeout_s),
                attributes,
                rpc,
                connectivity,
            )
            await self._enter(self.coap)
        ctx = ApiContext(
            settings=settings,
            admin_token=self.admin_token,
            registry=registry,
            attributes=attributes,
            rpc=rpc,
            connectivity=connectivity,
            timeseries=store,
            latest=latest,
            ingest=ingest,
            health=self.health,
            stats=self.stats,
            ready=self.not_ready,
            services=self._services,  # the list itself: it holds the HTTP server too
        )
        server = GranianHttpServer if settings.http.server == "granian" else HttpServer
        self.http = server(
            create_asgi_app(ctx),
            settings.host,
            settings.http,
            stats=ctx.long_polls.stats,
            before_stop=ctx.long_polls.close,
        )
        await self._enter(self.http)
        self.data_dir.write_run_info(self.run_info())
        self._started = True

    def health(self) -> dict[str, Health]:
        """Each started service's health, by name."""
        return {s.name: s.health() for s in self._services}

    def not_ready(self) -> list[str]:
        """Why this process should not be sent traffic now; empty when it is ready:
        every service started and healthy, and no shutdown asked for (`/readyz`)."""
        if self._shutdown.is_set():
            return ["shutting down"]
        if not self._started:
            return ["starting"]
        return [f"{name}: {h.detail or 'not ok'}" for name, h in self.health().items() if not h.ok]

    def stats(self) -> dict[str, dict[str, Any]]:
        """Each service's counters, by service name (those that have any)."""
        return {s.name: stats for s in self._services if (stats := s.stats())}

    def run_info(self) -> dict[str, Any]:
        """Where this process listens; written to run.json for the CLI and tests."""
        assert self.http is not None
        assert self.mqtt is not None
        host = self.settings.host
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
        mqtt: dict[str, Any] = {"host": host, "port": self.mqtt.port}
        if self.mqtt.tls_port is not None:
            mqtt["tls_port"] = self.mqtt.tls_port
        http: dict[str, Any] = {
            "host": host,
            "port": self.http.port,
            "url": f"http://{shown}:{self.http.port}",
        }
        if self.http.tls_port is not None:
            http["tls_port"] = self.http.tls_port
            http["tls_url"] = f"https://{shown}:{self.http.tls_port}"
        return {
            "pid": os.getpid(),
            "instance_id": instance_id(),
            "version": __version__,
            "data_dir": str(self.data_dir.path),
            "http": http,
            "mqtt": mqtt,
            **({"coap": self._coap_info(host)} if self.coap else {}),
        }

    def _coap_info(self, host: str) -> dict[str, Any]:
        assert self.coap is not None
        info: dict[str, Any] = {"host": host, "port": self.coap.port}
        if self.coap.dtls_port is not None:
            info["dtls_port"] = self.coap.dtls_port
        return info

    def shutdown(self) -> None:
        """Ask `wait_closed` to return (signal handlers call this)."""
        self._shutdown.set()

    async def wait_closed(self) -> None:
        """Return on `shutdown()`, or when a service's health check shows it died."""
        while not self._shutdown.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._shutdown.wait()
            if self.http is not None and not self.http.health().ok:
                log.error("http server stopped unexpectedly; shutting down")
                return
