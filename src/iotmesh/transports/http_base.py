"""What both HTTP servers (granian, hypercorn) share: their settings, binding the plain
and TLS sockets, health and stats. Each subclass hands the bound sockets to its server
software in `start` and undoes that in `stop`.

Error handling: `http.tls_port` without `http.certfile`/`http.keyfile`, a certificate
that cannot be loaded, or a port in use fails `_bind` with a `StartupError` that says
which; nothing stays bound after it.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable
from typing import Any

from iotmesh.core.errors import StartupError
from iotmesh.core.lifecycle import Health, Service
from iotmesh.core.settings import HttpSettings
from iotmesh.transports.sockets import bind_tcp

ALPN = ["h2", "http/1.1"]


class BaseHttpServer(Service):
    """Serves an ASGI app on `host:port` (and over TLS on `tls_port` when configured)."""

    name = "http"

    def __init__(
        self,
        app: Any,
        host: str,
        settings: HttpSettings,
        stats: Callable[[], dict[str, Any]] | None = None,
        before_stop: Callable[[], None] | None = None,
    ) -> None:
        """`before_stop` is called first thing in `stop` (the app ends its long-polls)."""
        self._before_stop = before_stop
        self._app = app
        self._host = host
        self._settings = settings
        self._stats = stats
        self.port = settings.port
        self.tls_port = settings.tls_port

    def _bind(self) -> tuple[socket.socket, socket.socket | None]:
        """Bind the plain socket and, when configured, the TLS one (its certificate is
        loaded first: the server software would only load it once serving)."""
        s = self._settings
        tls_sock = None
        if s.tls_port is not None:
            if s.certfile is None or s.keyfile is None:
                raise StartupError("http.tls_port needs http.certfile and http.keyfile")
            try:
                context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                context.load_cert_chain(s.certfile, s.keyfile)
            except (OSError, ssl.SSLError) as exc:
                raise StartupError(f"http tls: cannot load certificates: {exc}") from exc
            tls_sock = bind_tcp(self._host, s.tls_port, "http tls")
            self.tls_port = tls_sock.getsockname()[1]
        try:
            sock = bind_tcp(self._host, s.port, "http")
        except StartupError:
            if tls_sock is not None:
                tls_sock.close()
            raise
        self.port = sock.getsockname()[1]
        return sock, tls_sock

    def _notify_stop(self) -> None:
        if self._before_stop is not None:
            self._before_stop()

    def _health(self, ended: bool) -> Health:
        if ended:
            return Health(ok=False, detail="server task ended")
        return Health(ok=True, detail=f"listening on {self._host}:{self.port}")

    def stats(self) -> dict[str, Any]:
        return self._stats() if self._stats is not None else {}
