"""The HTTP server (hypercorn): HTTP/1.1 and HTTP/2 for the REST and device APIs.

Protocols: the plain port speaks HTTP/1.1 and HTTP/2 with prior knowledge (h2c: a
client that opens with the HTTP/2 preface, like `curl --http2-prior-knowledge`, gets
HTTP/2; hypercorn also honours an `Upgrade: h2c` from HTTP/1.1). The optional TLS
port (`http.tls_port`) offers `h2` and `http/1.1` by ALPN.

Keep-alive: a connection is never recycled after a number of requests (hypercorn's
default closes one after 1000), so an HTTP/2 connection carrying a device's uploads
for hours stays open; idle connections close after `http.keep_alive_s`.

Error handling: a port in use or a certificate that cannot be loaded fails `start`
with a `StartupError` that says which.

Resource handling: the listening sockets are bound in `start` (so a busy port fails
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

from iotmesh.core.lifecycle import Health
from iotmesh.transports.http_base import ALPN, BaseHttpServer

log = logging.getLogger(__name__)


class _PreboundConfig(Config):
    """Hypercorn config that serves sockets we already bound."""

    def __init__(self, plain: socket.socket, tls: socket.socket | None) -> None:
        super().__init__()
        self._plain = plain
        self._tls = tls

    def create_sockets(self) -> Sockets:
        secure = [self._tls] if self._tls is not None else []
        return Sockets(secure_sockets=secure, insecure_sockets=[self._plain], quic_sockets=[])


class HttpServer(BaseHttpServer):
    """Serves an ASGI app on `host:port` (and over TLS on `tls_port` when configured)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._stopped = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def _config(self) -> Config:
        s = self._settings
        sock, tls_sock = self._bind()
        config = _PreboundConfig(sock, tls_sock)
        config.bind = [f"{self._host}:{self.port}"]
        config.keep_alive_timeout = s.keep_alive_s
        # Long-lived HTTP/2 connections carry many device requests: do not recycle them.
        config.keep_alive_max_requests = 2**31
        config.accesslog = None
        config.errorlog = logging.getLogger("hypercorn.error")
        config.graceful_timeout = 5.0
        if tls_sock is not None:
            config.certfile = str(s.certfile)
            config.keyfile = str(s.keyfile)
            config.alpn_protocols = list(ALPN)
        return config

    async def start(self) -> None:
        config = self._config()
        self._task = asyncio.create_task(
            serve(self._app, config, shutdown_trigger=self._stopped.wait, mode="asgi"),
            name="http.serve",
        )
        await asyncio.sleep(0)

    async def stop(self) -> None:
        self._notify_stop()
        self._stopped.set()
        if self._task is not None:
            await self._task
            self._task = None

    def health(self) -> Health:
        return self._health(self._task is not None and self._task.done())
