"""The HTTP server (hypercorn): HTTP/1.1 and HTTP/2 for the REST and device APIs.

Resource handling: the listening socket is bound in `start` (so a busy port fails
start-up at once); `stop` stops accepting, lets in-flight requests finish within the
graceful timeout, then returns.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

from hypercorn.asyncio import serve
from hypercorn.config import Config, Sockets

from iotmesh.core.lifecycle import Health, Service
from iotmesh.core.settings import HttpSettings
from iotmesh.transports.sockets import bind_tcp

log = logging.getLogger(__name__)


class _PreboundConfig(Config):
    """Hypercorn config that serves a socket we already bound."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self._sock = sock

    def create_sockets(self) -> Sockets:
        return Sockets(secure_sockets=[], insecure_sockets=[self._sock], quic_sockets=[])


class HttpServer(Service):
    """Serves an ASGI app on `host:port`."""

    name = "http"

    def __init__(self, app: Any, host: str, settings: HttpSettings) -> None:
        self._app = app
        self._host = host
        self._settings = settings
        self._stopped = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.port = settings.port

    async def start(self) -> None:
        sock = bind_tcp(self._host, self._settings.port, "http")
        self.port = sock.getsockname()[1]
        config = _PreboundConfig(sock)
        config.bind = [f"{self._host}:{self.port}"]
        config.keep_alive_timeout = self._settings.keep_alive_s
        # Long-lived HTTP/2 connections carry many device requests: do not recycle them.
        config.keep_alive_max_requests = 2**31
        config.accesslog = None
        config.errorlog = logging.getLogger("hypercorn.error")
        config.graceful_timeout = 5.0
        self._task = asyncio.create_task(
            serve(self._app, config, shutdown_trigger=self._stopped.wait, mode="asgi"),
            name="http.serve",
        )
        await asyncio.sleep(0)

    async def stop(self) -> None:
        self._stopped.set()
        if self._task is not None:
            await self._task
            self._task = None

    def health(self) -> Health:
        if self._task is not None and self._task.done():
            return Health(ok=False, detail="server task ended")
        return Health(ok=True, detail=f"listening on {self._host}:{self.port}")
