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
import logging
from collections.abc import Awaitable, Callable, Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from iotmesh import __version__
from iotmesh.api import ApiContext, create_asgi_app
from iotmesh.bus import Bus, make_bus
from iotmesh.bus.broadcast import Broadcast
from iotmesh.bus.memory import MemoryBus
from iotmesh.commands import RpcService
from iotmesh.commands.rpc_housekeeping import RpcHousekeeping
from iotmesh.commands.wakeups import CLAIM_TTL_S, RpcNotifier
from iotmesh.core.ids import SERVICE_NAME, instance_id
from iotmesh.core.lifecycle import Health, Service
from iotmesh.core.loop_lag import EventLoopLag
from iotmesh.core.settings import HttpSettings, Settings
from iotmesh.core.tracing import INSTRUMENTATION, Tracer, Tracing, make_provider
from iotmesh.core.tracing import shutdown as shutdown_tracing
from iotmesh.devicestate import AttributeService, ConnectivityService
from iotmesh.pipeline import LatestCache, LatestValues, Pipeline
from iotmesh.pipeline.ingest import TelemetryIngest
from iotmesh.pipeline.sink import Sink
from iotmesh.pipeline.stages import Processor, make_cpu_work, make_validator
from iotmesh.registry import DeviceRegistry
from iotmesh.storage.retention import DevicesOfTypes, RetentionJob
from iotmesh.storage.rollup import RETENTION_FENCE
from iotmesh.storage.rpc_rows import RPC_FENCE
from iotmesh.storage.sqlite.sessions import FILE_NAME as SESSIONS_FILE
from iotmesh.storage.sqlite.sessions import SqliteSessionStore
from iotmesh.storage.sqlite.state import SqliteStateStore
from iotmesh.storage.sqlite.tsdb import SqliteTimeSeriesStore
from iotmesh.storage.state import StateStore
from iotmesh.storage.timeseries import TimeSeriesStore
from iotmesh.storage.writer import BatchWriter
from iotmesh.transports.coap import CoapServer
from iotmesh.transports.http_base import BaseHttpServer
from iotmesh.transports.mqtt import MqttServer

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.trace import TracerProvider

    from iotmesh.cluster import ClusterBackend
    from iotmesh.cluster.singleton import Singleton
    from iotmesh.storage.redis import HotState

log = logging.getLogger(__name__)

S = TypeVar("S", bound=Service)
AnyHttpServer = BaseHttpServer  # granian's or hypercorn's: only the one in use is imported


def timeseries_store(settings: Settings, data_dir: Path) -> TimeSeriesStore:
    """The time-series store `storage.timeseries` names (unopened)."""
    levels = [level.interval_ms for level in settings.storage.retention.rollups]
    if settings.storage.timeseries == "influxdb":
        # Imported only when chosen: the embedded default needs no InfluxDB client.
        from iotmesh.storage.influx import InfluxTimeSeriesStore

        return InfluxTimeSeriesStore(settings.storage.influxdb, levels=levels)
    if settings.storage.timeseries == "postgres":
        from iotmesh.storage.postgres import PostgresTimeSeriesStore

        return PostgresTimeSeriesStore(settings.storage.postgres, levels)
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


def coap_info(host: str, coap: CoapServer) -> dict[str, Any]:
    """Where a CoAP server listens, as run.json (and serve's run-info file) shows it."""
    info: dict[str, Any] = {"host": host, "port": coap.port}
    if coap.dtls_port is not None:
        info["dtls_port"] = coap.dtls_port
    return info


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
        service: the service name in spans (`iotmesh`, or `iotmesh-<role>` for serve).
        tracer_provider: with `tracing.enabled`, spans go to this provider instead of
            the one the settings describe (tests read them with an in-memory exporter).
        elect: run singleton jobs (retention, RPC housekeeping) under leader election on the cluster
            engine, as candidate `elect` (`iotmesh serve`: `<role>-<instance id>`);
            None (`iotmesh run`): one process, the jobs run directly.
    """

    def __init__(
        self,
        settings: Settings,
        data_dir: Path,
        stack: contextlib.AsyncExitStack,
        instance_dir: Path | None = None,
        *,
        service: str = SERVICE_NAME,
        tracer_provider: TracerProvider | None = None,
        elect: str | None = None,
    ) -> None:
        self.settings = settings
        self.elect = elect
        self.data_dir = data_dir
        self.instance_dir = instance_dir if instance_dir is not None else data_dir
        self.service = service
        self.services: list[Service] = []
        self.started = False
        self.stopping = False
        self._tracer_provider = tracer_provider
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

    def not_ready(self) -> list[str]:
        """Why this process should not be sent traffic now; empty when it is ready:
        every service started (`started`) and healthy, and not `stopping` (`/readyz`)."""
        if self.stopping:
            return ["shutting down"]
        if not self.started:
            return ["starting"]
        return [f"{name}: {h.detail or 'not ok'}" for name, h in self.health().items() if not h.ok]

    # -- observability ----------------------------------------------------------------------

    async def event_loop_lag(self) -> EventLoopLag:
        """How late this process's event loop runs (`iotmesh_event_loop_*` on /metrics)."""
        return await self.enter(EventLoopLag())

    def tracing(self) -> Tracing | None:
        """The tracer of every service, None when tracing is off (see core/tracing.py).

        Build it first: its provider is shut down (sending the spans still batched)
        when the stack closes, which must be after every service stopped."""
        if "tracing" not in self._built:
            self._built["tracing"] = self._make_tracing()
        tracing: Tracing | None = self._built["tracing"]
        return tracing

    def tracer(self) -> Tracer | None:
        tracing = self.tracing()
        return None if tracing is None else tracing.tracer

    def _make_tracing(self) -> Tracing | None:
        if not self.settings.tracing.enabled:
            return None
        provider = self._tracer_provider
        if provider is None:
            built = make_provider(
                self.settings.tracing,
                service=self.service,
                version=__version__,
                instance=instance_id(),
            )
            self._stack.push_async_callback(self._stop_tracing, built)
            provider = built
        tracer = provider.get_tracer(INSTRUMENTATION, __version__)
        return Tracing(tracer, self.settings.tracing.sample_ratio)

    async def _stop_tracing(self, provider: SdkTracerProvider) -> None:
        if not await shutdown_tracing(provider, self.settings.tracing.export_timeout_s):
            log.warning("tracing: the collector did not take the last spans; dropped")

    # -- state ----------------------------------------------------------------------------

    async def hot(self) -> HotState | None:
        """The Redis hot state, when `storage.redis` puts anything there (`uses_redis`)."""
        if "hot" not in self._built:
            hot = None
            if uses_redis(self.settings):
                # Imported only when chosen, like the other engines.
                from iotmesh.storage.redis import HotState

                hot = await self.enter(HotState(self.settings.storage.redis))
            self._built["hot"] = hot
        hot_: HotState | None = self._built["hot"]
        return hot_

    async def registry(self) -> DeviceRegistry:
        """The device registry; starting it opens (and migrates) the state store."""
        if "registry" not in self._built:
            await self.hot()  # before the state: it stops after them
            state = state_store(self.settings, self.data_dir)
            self._built["state"] = state
            self._built["registry"] = await self.enter(DeviceRegistry(state))
        registry: DeviceRegistry = self._built["registry"]
        return registry

    async def _state(self) -> StateStore:
        await self.registry()
        state: StateStore = self._built["state"]
        return state

    async def attributes(self) -> AttributeService:
        if "attributes" not in self._built:
            state = await self._state()
            hot = await self.hot()
            cache = None
            if hot is not None and self.settings.storage.redis.attribute_cache:
                from iotmesh.storage.redis import RedisAttributeCache

                cache = RedisAttributeCache(hot)
            service = AttributeService(state, cache, await self.broadcast())
            self._built["attributes"] = await self.enter(service)
        attributes: AttributeService = self._built["attributes"]
        return attributes

    async def rpc(self) -> RpcService:
        if "rpc" not in self._built:
            state = await self._state()
            notifier = await self._rpc_notifier()
            service = RpcService(state, self.settings.devices, notifier=notifier)
            self._built["rpc"] = await self.enter(service)
        rpc: RpcService = self._built["rpc"]
        return rpc

    async def _rpc_notifier(self) -> RpcNotifier | None:
        """RPC wake-ups and claims between processes: on the Redis hot state with
        `storage.redis.rpc_wakeups`; else on the bus's engine when it is NATS or Redis
        (so any `serve` deployment has them); none on the in-process bus. A new one per
        call (its own claim member): the RPC service's and the housekeeping job's."""
        hot = await self.hot()
        if hot is not None and self.settings.storage.redis.rpc_wakeups:
            from iotmesh.storage.redis import RedisRpcNotifier

            return RedisRpcNotifier(hot, CLAIM_TTL_S)
        bus_settings = self.settings.bus
        if bus_settings.backend == "nats":
            from iotmesh.bus.nats import NatsBus
            from iotmesh.bus.nats_rpc import NatsRpcNotifier

            bus = await self.bus()
            assert isinstance(bus, NatsBus)
            return NatsRpcNotifier(bus, CLAIM_TTL_S)
        if bus_settings.backend == "redis":
            from iotmesh.storage.redis import HotState, RedisRpcNotifier

            if "rpc_redis" not in self._built:
                # The bus's Redis and namespace, with the hot state's timeouts.
                on_bus = self.settings.storage.redis.model_copy(
                    update={"url": bus_settings.redis_url, "namespace": bus_settings.namespace}
                )
                bus_hot = HotState(on_bus)
                bus_hot.name = "rpc_redis"
                self._built["rpc_redis"] = await self.enter(bus_hot)
            return RedisRpcNotifier(self._built["rpc_redis"], CLAIM_TTL_S)
        return None

    async def broadcast(self) -> Broadcast | None:
        """The bus engine's live fan-out between processes (`bus/broadcast.py`); None
        on the in-process bus (nothing to cross), which is then not built for it."""
        if self.settings.bus.backend == "memory":
            return None
        return (await self.bus()).broadcast()

    async def connectivity(self) -> ConnectivityService:
        if "connectivity" not in self._built:
            state = await self._state()
            hot = await self.hot()
            redis = self.settings.storage.redis
            mirror = None
            if hot is not None and redis.connectivity:
                from iotmesh.storage.redis import RedisConnectivityMirror

                mirror = RedisConnectivityMirror(hot)
            service = ConnectivityService(
                self.settings.devices.inactivity_timeout_s,
                store=state,
                mirror=mirror,
                mirror_interval_s=redis.connectivity_flush_s,
            )
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
            writer = BatchWriter(await self.timeseries(), self.settings.writer, self.tracer())
            self._built["writer"] = await self.enter(writer)
        writer_: BatchWriter = self._built["writer"]
        return writer_

    async def retention(self) -> RetentionJob:
        """The retention and rollup job over the time-series store (`storage.retention`).

        `iotmesh run` starts it; with `elect` (serve) it runs only while this instance
        leads lease `retention`, fenced by the term's token (engine fence before each
        pass, and in PostgreSQL's transactions). On InfluxDB the rollup step runs beside
        it, in the same terms (SQLite and PostgreSQL run their own rollup work in the
        store)."""
        if "retention" not in self._built:
            registry = await self.registry()
            store = await self.timeseries()
            retention = self.settings.storage.retention
            companions = self._rollup_jobs(store)
            if self.elect is None:
                job = await self.enter(RetentionJob(store, retention, devices_of_types(registry)))
                for companion in companions:
                    await self.enter(companion)
            else:
                fence = await self._engine_fence(RETENTION_FENCE)
                job = RetentionJob(store, retention, devices_of_types(registry), fence)
                await self.singleton(job, on_elected=job.use_token, companions=companions)
            self._built["retention"] = job
        job_: RetentionJob = self._built["retention"]
        return job_

    def _rollup_jobs(self, store: TimeSeriesStore) -> list[Service]:
        """The background rollup step of a store that needs one run beside retention."""
        if self.settings.storage.timeseries != "influxdb":
            return []
        from iotmesh.storage.influx import InfluxTimeSeriesStore, RollupJob

        if isinstance(store, InfluxTimeSeriesStore) and store.rollups is not None:
            return [RollupJob(store.rollups)]
        return []

    async def rpc_housekeeping(self) -> RpcHousekeeping:
        """The purge of old finished RPC requests, and (with a notifier: several
        processes) the sweep that ends overdue requests no process holds
        (`commands/rpc_housekeeping.py`).

        `iotmesh run` starts it; with `elect` (serve) it runs only while this instance
        leads lease `rpc_housekeeping`, fenced by the term's token (engine fence before
        each pass, and in the SQL state store's transactions)."""
        if "rpc_housekeeping" not in self._built:
            state = await self._state()
            notifier = await self._rpc_notifier()
            devices = self.settings.devices
            if self.elect is None:
                job = RpcHousekeeping(state, devices, notifier=notifier)
                await self.enter(job)
            else:
                fence = await self._engine_fence(RPC_FENCE)
                job = RpcHousekeeping(state, devices, notifier=notifier, fence=fence)
                await self.singleton(job, on_elected=job.use_token)
            self._built["rpc_housekeeping"] = job
        job_: RpcHousekeeping = self._built["rpc_housekeeping"]
        return job_

    # -- cluster (serve) ------------------------------------------------------------------

    async def cluster(self) -> ClusterBackend:
        """The cluster engine (`cluster.backend`) for leader leases and fences."""
        if "cluster" not in self._built:
            # Imported only when used: `iotmesh run` elects nothing.
            from iotmesh.cluster import make_backend

            self._built["cluster"] = await self.enter(make_backend(self.settings))
        cluster: ClusterBackend = self._built["cluster"]
        return cluster

    async def _engine_fence(self, resource: str) -> Callable[[int], Awaitable[None]]:
        """A singleton job's check before each pass: its token written to `resource` in
        the cluster engine's fence (refused once a newer leader wrote), as this candidate."""
        cluster = await self.cluster()
        assert self.elect is not None
        owner = self.elect.encode()

        async def fence(token: int) -> None:
            await cluster.write(resource, token, owner)

        return fence

    async def singleton(
        self,
        job: Service,
        on_elected: Callable[[int], None] | None = None,
        companions: Sequence[Service] = (),
    ) -> Singleton:
        """Start `job` under leader election (`elect` must be set): it runs while this
        instance leads lease `job.name`; `on_elected` gets each term's fencing token;
        `companions` run in the same terms."""
        from iotmesh.cluster.singleton import Singleton

        assert self.elect is not None, "singleton jobs need a candidate name (elect)"
        cluster = await self.cluster()
        lease_s = self.settings.cluster.lease_s
        elected = Singleton(
            cluster,
            job,
            lease_s=lease_s,
            owner=self.elect,
            on_elected=on_elected,
            companions=companions,
        )
        return await self.enter(elected)

    async def latest(self, cache: bool = True) -> LatestCache:
        """Latest values: in Redis when `storage.latest = "redis"` (shared by every
        process), else an in-process cache; `cache=False` (serve, where another process
        commits and this one would never see it) keeps nothing, so reads go to the store."""
        if self.settings.storage.latest == "redis":
            hot = await self.hot()
            if hot is not None:
                from iotmesh.storage.redis import RedisLatestValues

                return RedisLatestValues(hot)
        return LatestValues() if cache else LatestValues(max_devices=0)

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
        latest: LatestCache,
        processors: list[Processor] | None = None,
        **consume: str,
    ) -> Pipeline:
        """A pipeline consuming the bus into `sink` (`consume`: pattern, group)."""
        stages = self.processors() if processors is None else processors
        bus = await self.bus()
        return await self.enter(Pipeline(bus, sink, latest, stages, self.tracer(), **consume))

    # -- device-facing --------------------------------------------------------------------

    async def mqtt(self) -> MqttServer:
        """The MQTT server, publishing telemetry to the bus (it waits for room: slow
        acks, not errors)."""
        sync = self.settings.storage.sqlite.synchronous
        server = MqttServer(
            self.settings.host,
            self.settings.mqtt,
            await self.registry(),
            TelemetryIngest(await self.bus(), None, self.tracing()),
            await self.attributes(),
            await self.rpc(),
            sessions=SqliteSessionStore(self.instance_dir / SESSIONS_FILE, sync),
            connectivity=await self.connectivity(),
        )
        return await self.enter(server)

    async def coap(self) -> CoapServer:
        """The CoAP server (UDP, and DTLS with PSK when configured)."""
        server = CoapServer(
            self.settings.host,
            self.settings.coap,
            await self.registry(),
            TelemetryIngest(await self.bus(), self.settings.coap.enqueue_timeout_s),
            await self.attributes(),
            await self.rpc(),
            await self.connectivity(),
        )
        return await self.enter(server)

    async def api_context(
        self,
        admin_token: str,
        latest: LatestCache,
        health: Callable[[], dict[str, Health]] | None = None,
        stats: Callable[[], dict[str, dict[str, Any]]] | None = None,
    ) -> ApiContext:
        """What the REST and device HTTP API need, built from the services."""
        bus = await self.bus()
        return ApiContext(
            settings=self.settings,
            admin_token=admin_token,
            registry=await self.registry(),
            attributes=await self.attributes(),
            rpc=await self.rpc(),
            connectivity=await self.connectivity(),
            timeseries=await self.timeseries(),
            latest=latest,
            ingest=TelemetryIngest(bus, self.settings.http.enqueue_timeout_s, self.tracing()),
            health=health or self.health,
            stats=stats or self.stats,
            ready=self.not_ready,
            services=self.services,  # the list itself: it will hold the HTTP server too
            service=self.service,
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
        server_class: type[BaseHttpServer]
        if settings.server == "granian":
            from iotmesh.transports.http_granian import GranianHttpServer

            server_class = GranianHttpServer
        else:  # hypercorn costs ~10 MB of RSS when imported, so only when chosen
            from iotmesh.transports.http import HttpServer

            server_class = HttpServer
        server = server_class(
            app, self.settings.host, settings, stats=stats, before_stop=before_stop
        )
        return await self.enter(server)
