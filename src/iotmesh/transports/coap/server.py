"""The CoAP server service: aiocoap on a UDP socket we bind ourselves.

Why bind ourselves: aiocoap's own server binding sets SO_REUSEPORT, so a second
process could bind the same port and silently take part of the traffic, and a busy
port would not be noticed. We bind without it (a busy port fails start-up with one
line, like MQTT and HTTP) and hand the socket to aiocoap's udp6 transport. That uses
two of aiocoap's underscore-named hooks (`Context._append_tokenmanaged_messagemanaged_
transport`, `MessageInterfaceUDP6._create_transport_endpoint`), which is why
pyproject.toml pins aiocoap to 0.4.x; `tests/integration/test_coap_server.py` breaks
first if they change. The same subclass puts the telemetry fast path (`fastpath.py`)
in front of aiocoap's handling of each datagram.

Resource handling: `start` binds, then serves. `stop` refuses new requests (5.03 with
Max-Age), lets requests being committed finish (at most DRAIN_TIMEOUT_S; their 2.04
still goes out), ends every observation, then shuts aiocoap down, which closes the
socket.

Error handling: errors of a request become its response code in
`device_api.DeviceApiSite.error_response`; a bug in a handler becomes 5.00 (aiocoap
logs it) and the server goes on serving others.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from typing import Any

import msgspec
from aiocoap import Context
from aiocoap.transports.udp6 import MessageInterfaceUDP6

from iotmesh.commands.rpc import RpcService
from iotmesh.core.errors import StartupError
from iotmesh.core.lifecycle import Health, Service
from iotmesh.core.settings import CoapSettings
from iotmesh.devicestate import AttributeService, ConnectivityService
from iotmesh.pipeline.ingest import TelemetryIngest
from iotmesh.registry.service import DeviceRegistry
from iotmesh.transports.coap.device_api import DeviceApiSite
from iotmesh.transports.coap.dtls import PskKeys, start_dtls
from iotmesh.transports.coap.fastpath import FastTelemetry, reply_ancdata
from iotmesh.transports.sockets import bind_failed

log = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 5.0


def _ipv6_form(host: str) -> str:
    """The address to bind an AF_INET6 dual-stack socket to (IPv4 as ::ffff:a.b.c.d)."""
    if host in ("", "0.0.0.0", "::"):
        return "::"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host  # a name: getaddrinfo below resolves it
    return f"::ffff:{address}" if address.version == 4 else host


def bind_udp(host: str, port: int, what: str) -> socket.socket:
    """Bind a dual-stack UDP socket (no SO_REUSEPORT), or raise `StartupError`."""
    try:
        infos = socket.getaddrinfo(
            _ipv6_form(host),
            port,
            socket.AF_INET6,
            socket.SOCK_DGRAM,
            flags=socket.AI_PASSIVE | socket.AI_V4MAPPED,
        )
    except socket.gaierror as exc:
        raise StartupError(f"{what}: cannot resolve host {host!r}: {exc.strerror}") from exc
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(infos[0][4])
    except OSError as exc:
        sock.close()
        raise bind_failed(exc, what, host, port) from exc
    sock.setblocking(False)
    return sock


class _Udp6WithFastPath(MessageInterfaceUDP6):  # type: ignore[misc]
    """aiocoap's udp6 transport with the telemetry fast path in front of it."""

    fast: FastTelemetry | None = None

    def datagram_msg_received(
        self, data: bytes, ancdata: list[Any], flags: int, address: Any
    ) -> None:
        fast = self.fast
        if fast is not None and fast.handle(data, reply_ancdata(ancdata), address, self._send):
            return
        super().datagram_msg_received(data, ancdata, flags, address)

    def _send(self, data: bytes, ancdata: list[Any], address: Any) -> None:
        if self.fast is not None:  # else shut down: the socket is gone
            self.transport.sendmsg(data, ancdata, 0, address)

    async def shutdown(self) -> None:
        self.fast = None
        await super().shutdown()


class CoapServer(Service):
    """Serves the ThingsBoard CoAP device API on UDP `host:port`."""

    name = "coap"

    def __init__(
        self,
        host: str,
        settings: CoapSettings,
        registry: DeviceRegistry,
        ingest: TelemetryIngest,
        attributes: AttributeService,
        rpc: RpcService,
        connectivity: ConnectivityService,
    ) -> None:
        self._host = host
        self._settings = settings
        self.site = DeviceApiSite(settings, registry, ingest, attributes, rpc, connectivity)
        self.fast = FastTelemetry(self.site, registry)
        self.keys = PskKeys(registry)
        self._context: Any = None
        self.port = settings.port
        self.dtls_port = settings.dtls_port

    async def start(self) -> None:
        sock = bind_udp(self._host, self._settings.port, "coap")
        self.port = sock.getsockname()[1]
        loop = asyncio.get_running_loop()
        context = Context(loop=loop, serversite=self.site, loggername="iotmesh.coap.aiocoap")
        try:
            await context._append_tokenmanaged_messagemanaged_transport(
                lambda mman: _Udp6WithFastPath._create_transport_endpoint(
                    sock, mman, context.log, loop
                )
            )
        except BaseException:
            sock.close()
            raise
        context.request_interfaces[-1].token_interface.message_interface.fast = self.fast
        self._context = context
        if self._settings.dtls_port is not None:
            try:
                await self._start_dtls(context)
            except BaseException:
                await self.stop()
                raise

    async def _start_dtls(self, context: Any) -> None:
        if self._host in ("", "0.0.0.0", "::"):
            # aiocoap's DTLS server answers from the socket's address; on the
            # any-address that may not be the one the client wrote to.
            raise StartupError("coap.dtls_port needs a specific host, not the any-address")
        sock = bind_udp(self._host, self._settings.dtls_port or 0, "coap dtls")
        self.dtls_port = sock.getsockname()[1]
        await start_dtls(context, sock, self.keys, self._settings.max_dtls_sessions)

    async def stop(self) -> None:
        context, self._context = self._context, None
        if context is None:
            return
        site = self.site
        site.draining = True
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        # Polling is fine here: it runs once, at shutdown, for at most DRAIN_TIMEOUT_S.
        while site.inflight > 0 and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        site.stop_observations()
        self.keys.close()
        await asyncio.sleep(0)  # let the cancelled observations run their cleanup
        await context.shutdown()

    def stats(self) -> dict[str, Any]:
        site = self.site
        return {
            **msgspec.structs.asdict(site.stats),
            "telemetry_fast_path": self.fast.taken,
            "dedup_entries": len(self.fast.recent),
            "observations": len(site.observations),
            "inflight": site.inflight,
        }

    def health(self) -> Health:
        if self._context is None:
            return Health(ok=False, detail="not started")
        return Health(ok=True, detail=f"udp {self._host}:{self.port}")
