"""The HTTP server on granian (Rust: hyper, rustls), embedded in our event loop.

Why granian: HTTP parsing, HTTP/2 framing, flow control and TLS run in Rust threads;
only the ASGI app runs in Python on our event loop, next to the pipeline it submits to.
On the benchmark machine a bare ASGI app serves about 3 times as many requests per
second under granian as under hypercorn, whose protocol work (h11, h2) is Python on
the same core as everything else (docs/benchmarks.md, bench/http_ingest.py).

Granian's embedded server is marked experimental by its authors; `http.server =
"hypercorn"` (transports/http.py) serves the same app with the same settings.

Protocols: the plain port answers HTTP/1.1 and HTTP/2 with prior knowledge (granian's
"auto" mode looks at the connection preface); the TLS port offers `h2` and `http/1.1`
by ALPN. Connections are never recycled after a number of requests; idle HTTP/1.1
connections close after `http.keep_alive_s`, HTTP/2 ones are pinged every
`http.keep_alive_s` and closed when a ping goes unanswered.

Error handling: a port in use, or `http.tls_port` without a loadable certificate, fails
`start` with a `StartupError` that says which.

Resource handling: the listening sockets are bound in `start` and handed to granian by
file descriptor; `stop` asks granian to stop accepting, waits for its workers (in-flight
requests) within the graceful timeout, then closes the sockets.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from pathlib import Path
from typing import Any

from granian._granian import SocketHolder
from granian.constants import HTTPModes, Interfaces, SSLProtocols
from granian.http import HTTP1Settings, HTTP2Settings
from granian.server.embed import Server

from iotmesh.core.lifecycle import Health
from iotmesh.transports.http_base import BaseHttpServer

log = logging.getLogger(__name__)

GRACEFUL_S = 5
BACKLOG = 1024


class _PreboundServer(Server):
    """Granian's embedded server on a socket we bound (port 0 works, errors are ours)."""

    def __init__(self, sock: socket.socket, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._sock = sock

    def _init_shared_socket(self) -> None:
        # A duplicate: granian's side owns (and closes) the descriptor it is given.
        self._ssp = None
        # Its constructor is missing from granian's stubs: (fd, is_uds, backlog).
        self._shd = SocketHolder(os.dup(self._sock.fileno()), False, BACKLOG)  # type: ignore[call-arg,assignment]


class GranianHttpServer(BaseHttpServer):
    """Serves an ASGI app on `host:port` (and over TLS on `tls_port` when configured)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._servers: list[_PreboundServer] = []
        self._sockets: list[socket.socket] = []
        self._tasks: list[asyncio.Task[None]] = []

    def _server(
        self, sock: socket.socket, cert: tuple[Path, Path] | None = None
    ) -> _PreboundServer:
        tls: dict[str, Any] = {}
        if cert is not None:
            # TLS 1.2 too: granian's default minimum is 1.3, which many devices lack.
            tls = {"ssl_cert": cert[0], "ssl_key": cert[1], "ssl_protocol_min": SSLProtocols.tls12}
        return _PreboundServer(
            sock,
            target=self._app,
            address=self._host,
            port=sock.getsockname()[1],
            interface=Interfaces.ASGINL,  # the platform runs the app's lifetime itself
            http=HTTPModes.auto,
            websockets=False,
            backlog=BACKLOG,
            # Granian's default (backlog / workers = 1024) would let 1024 waiting
            # long-polls hold up every other request.
            backpressure=self._settings.max_concurrent_requests,
            # An idle HTTP/1.1 connection waits for its next request's headers: closed
            # after keep_alive_s (hyper's header read timeout covers that wait).
            http1_settings=HTTP1Settings(
                keep_alive=True, header_read_timeout=int(self._settings.keep_alive_s * 1000)
            ),
            http2_settings=HTTP2Settings(
                keep_alive_interval=int(self._settings.keep_alive_s * 1000),
                max_concurrent_streams=1000,
            ),
            log_enabled=False,
            **tls,
        )

    async def start(self) -> None:
        sock, tls_sock = self._bind()
        s = self._settings
        cert = None
        if tls_sock is not None and s.certfile is not None and s.keyfile is not None:
            cert = (s.certfile, s.keyfile)  # `_bind` checked they are set
        self._sockets = [sock] if tls_sock is None else [sock, tls_sock]
        self._servers = [self._server(sock)]
        if tls_sock is not None:
            self._servers.append(self._server(tls_sock, cert))
        for i, server in enumerate(self._servers):
            server.workers_kill_timeout = GRACEFUL_S
            self._tasks.append(asyncio.create_task(server.serve(), name=f"http.serve-{i}"))
        await asyncio.sleep(0)

    async def stop(self) -> None:
        self._notify_stop()
        for server in self._servers:
            server.stop()  # type: ignore[no-untyped-call]
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
            # Granian's Rust threads finish their shutdown a few loop turns after its
            # workers returned; a process that exits sooner makes them panic.
            await asyncio.sleep(0.1)
        self._tasks = []
        self._servers = []
        for sock in self._sockets:
            sock.close()
        self._sockets = []

    def health(self) -> Health:
        return self._health(any(t.done() for t in self._tasks))
