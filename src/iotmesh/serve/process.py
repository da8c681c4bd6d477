"""One `iotmesh serve SERVICE` process: its role's services, /healthz, run info, registry.

Usage:
    async with ServedProcess(settings, "pipeline") as process:
        await process.wait_closed()   # until `shutdown()` or its listener dies

Error handling: `serve` refuses the in-process bus (`ConfigError`): separate processes
share nothing through it. An unreachable cluster engine fails start-up (registration).
A service that fails to start stops those already started (reverse order) and the
error propagates to the CLI, which exits with status 2.
Resource handling: the services are entered into one `AsyncExitStack` as they are built
(`iotmesh.wiring.Builder`), then the health listener, then the registrar (the cluster
registry, `registration.py`); they leave in reverse order: deregister, stop listening,
stop consuming (in-flight batches settle), flush the writer, close the stores, flush
the spans. The instance's lock and run-info file go last.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from iotmesh.core.errors import ConfigError
from iotmesh.core.ids import SERVICE_NAME
from iotmesh.core.settings import Settings
from iotmesh.datadir import DataDir
from iotmesh.process import ServiceProcess
from iotmesh.serve.health import create_health_app
from iotmesh.serve.instance import InstanceInfo, Registrar, default_instance_id
from iotmesh.serve.registration import cluster_registrar
from iotmesh.serve.roles import ROLES, Endpoints, start_role
from iotmesh.wiring import AnyHttpServer, Builder, coap_info

log = logging.getLogger(__name__)


class ServedProcess(ServiceProcess):
    """The services of one role in this process."""

    def __init__(self, settings: Settings, role: str, registrar: Registrar | None = None) -> None:
        """`registrar`: where the instance registers; default: the cluster registry."""
        if role not in ROLES:
            raise ConfigError(f"unknown service {role!r}; choose one of {', '.join(ROLES)}")
        if settings.bus.backend == "memory":
            raise ConfigError(
                "iotmesh serve needs a bus the processes share: set bus.backend to"
                " nats or redis (the memory bus lives inside one process; use iotmesh run)"
            )
        self.settings = settings
        self.role = role
        self.instance_id = settings.serve.instance_id or default_instance_id()
        self.data_dir = DataDir(settings.data_dir, f"{role}-{self.instance_id}")
        self.admin_token = ""
        self.admin_token_generated = False
        self.info: InstanceInfo | None = None
        self.endpoints = Endpoints()
        self.listener: AnyHttpServer | None = None
        self._registrar = registrar or cluster_registrar(settings, self._registry_health)
        self._stack = contextlib.AsyncExitStack()
        self._builder = Builder(
            settings,
            self.data_dir.path,
            self._stack,
            self.data_dir.own_dir,
            service=f"{SERVICE_NAME}-{role}",
            elect=f"{role}-{self.instance_id}",
        )
        self._shutdown = asyncio.Event()

    async def _start(self) -> None:
        build = self._builder
        await build.event_loop_lag()
        self.endpoints = await start_role(self.role, build, self._admin_token)
        if self.endpoints.http is not None:
            self.listener = self.endpoints.http
        else:
            http = self.settings.http.model_copy(
                update={"port": self.settings.serve.health_port, "tls_port": None}
            )
            app = create_health_app(
                build.health,
                lambda: self.info,
                build.stats,
                build.not_ready,
                build.services,  # the list itself: it will hold the listener too
                build.service,
            )
            self.listener = await build.serve_asgi(app, http)
        self.info = InstanceInfo(self.role, self.instance_id, self._addresses())
        await self._stack.enter_async_context(self._registrar(self.info))
        self.data_dir.write_run_info(self.run_info())
        build.started = True

    def _registry_health(self) -> str:
        """The health the registry shows: draining once stopping (take no new work)."""
        if self._builder.stopping:
            return "draining"
        return "ok" if all(h.ok for h in self._builder.health().values()) else "degraded"

    def _addresses(self) -> dict[str, str]:
        assert self.listener is not None
        host = self.settings.host
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
        url = f"http://{shown}:{self.listener.port}"
        addresses = {"health": url}
        if self.endpoints.http is not None:
            addresses["http"] = url
        if self.endpoints.mqtt is not None:
            addresses["mqtt"] = f"{shown}:{self.endpoints.mqtt.port}"
        if self.endpoints.coap is not None:
            addresses["coap"] = f"{shown}:{self.endpoints.coap.port}"
        return addresses

    def run_info(self) -> dict[str, Any]:
        """`instances/<service>-<id>.json`: run.json's fields plus the instance's."""
        assert self.info is not None
        info: dict[str, Any] = {
            "pid": self.info.pid,
            "version": self.info.version,
            "service": self.role,
            "instance_id": self.instance_id,
            "data_dir": str(self.data_dir.path),
            "health": {"url": self.info.addresses["health"]},
        }
        if self.endpoints.http is not None:
            info["http"] = {
                "host": self.settings.host,
                "port": self.endpoints.http.port,
                "url": self.info.addresses["http"],
            }
        if self.endpoints.mqtt is not None:
            info["mqtt"] = {"host": self.settings.host, "port": self.endpoints.mqtt.port}
        if self.endpoints.coap is not None:
            info["coap"] = coap_info(self.settings.host, self.endpoints.coap)
        return info

    def shutdown(self) -> None:
        """Ask `wait_closed` to return (signal handlers call this)."""
        self._builder.stopping = True
        self._shutdown.set()

    async def wait_closed(self) -> None:
        """Return on `shutdown()`, or when the HTTP listener shows it died."""
        while not self._shutdown.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._shutdown.wait()
            if self.listener is not None and not self.listener.health().ok:
                log.error("http listener stopped unexpectedly; shutting down")
                return
