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
from typing import TYPE_CHECKING, Any

from iotmesh import __version__
from iotmesh.core.ids import instance_id
from iotmesh.core.lifecycle import Health
from iotmesh.core.settings import Settings
from iotmesh.datadir import DataDir
from iotmesh.process import ServiceProcess
from iotmesh.transports.coap import CoapServer
from iotmesh.transports.mqtt import MqttServer
from iotmesh.wiring import (
    AnyHttpServer,
    Builder,
    coap_info,
    devices_of_types,
    state_store,
    timeseries_store,
    uses_redis,
)

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

log = logging.getLogger(__name__)

__all__ = ["Platform", "devices_of_types", "state_store", "timeseries_store", "uses_redis"]


class Platform(ServiceProcess):
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
        self.data_dir = DataDir(settings.data_dir)
        self.admin_token = ""
        self.admin_token_generated = False
        self._stack = contextlib.AsyncExitStack()
        self._builder = Builder(
            settings, self.data_dir.path, self._stack, tracer_provider=tracer_provider
        )
        self._shutdown = asyncio.Event()
        self.http: AnyHttpServer | None = None
        self.mqtt: MqttServer | None = None
        self.coap: CoapServer | None = None

    async def _start(self) -> None:
        self._admin_token()
        # In dependency order (the builder enters each as it is built): tracing (its
        # provider flushes last), state (with RPC housekeeping), the store, its writer
        # and retention job, the bus and the pipeline, then device traffic.
        build = self._builder
        build.tracing()
        await build.event_loop_lag()
        await build.registry()
        await build.attributes()
        await build.rpc()
        await build.rpc_housekeeping()
        await build.connectivity()
        writer = await build.writer()
        await build.retention()
        latest = await build.latest()
        await build.pipeline(writer, latest)
        self.mqtt = await build.mqtt()
        if self.settings.coap.enabled:
            self.coap = await build.coap()
        ctx = await build.api_context(self.admin_token, latest)
        self.http = await build.http(ctx)
        self.data_dir.write_run_info(self.run_info())
        build.started = True

    def health(self) -> dict[str, Health]:
        """Each started service's health, by name."""
        return self._builder.health()

    def not_ready(self) -> list[str]:
        """Why this process should not be sent traffic now (`/readyz`); empty: ready."""
        return self._builder.not_ready()

    def stats(self) -> dict[str, dict[str, Any]]:
        """Each service's counters, by service name (those that have any)."""
        return self._builder.stats()

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
            **({"coap": coap_info(host, self.coap)} if self.coap else {}),
        }

    def shutdown(self) -> None:
        """Ask `wait_closed` to return (signal handlers call this)."""
        self._builder.stopping = True  # /readyz: no new traffic from now on
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
