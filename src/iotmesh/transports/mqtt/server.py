"""The MQTT server service: listeners, sessions, wills, and an orderly shutdown.

Resource handling: the listening sockets are bound in `start` (a busy port fails
start-up with one line). `stop` first stops accepting and reading, lets messages that
are being committed finish (their acks still go out), then closes every connection
(v5 clients get DISCONNECT 0x8B "server shutting down").
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import ssl
import time
from typing import Any

from iotmesh.commands.rpc import RpcService
from iotmesh.core.errors import StartupError
from iotmesh.core.lifecycle import Health, Service
from iotmesh.core.settings import MqttSettings
from iotmesh.devicestate import AttributeService
from iotmesh.pipeline.ingest import TelemetryIngest
from iotmesh.proto.mqtt import Publish, ReasonCode, Will
from iotmesh.registry.service import DeviceRegistry
from iotmesh.transports.mqtt.auth import Principal, allowed
from iotmesh.transports.mqtt.broker import Broker
from iotmesh.transports.mqtt.connection import MqttConnection
from iotmesh.transports.mqtt.device_api import DeviceApi
from iotmesh.transports.mqtt.session import Session, copy_for
from iotmesh.transports.mqtt.stats import MqttStats
from iotmesh.transports.sockets import bind_tcp

log = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 5.0


class ServerContext:
    """What every connection of one server shares."""

    def __init__(
        self, settings: MqttSettings, registry: DeviceRegistry, device_api: DeviceApi
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.device_api = device_api
        self.broker = Broker(self._may_receive)
        self.sessions: dict[str, Session] = {}
        self.connections: set[MqttConnection] = set()
        self.stats = MqttStats()
        self.loop = asyncio.get_running_loop()
        self._ids = itertools.count(1)
        self._prefix = os.urandom(4).hex()
        self._will_timers: dict[str, asyncio.TimerHandle] = {}

    def _may_receive(self, session: Session, topic: str) -> bool:
        return allowed(Principal(session.device), topic, "subscribe", self.settings.acl)

    def new_client_id(self) -> str:
        """A client id for a client that sent an empty one."""
        return f"iotmesh-{self._prefix}-{next(self._ids)}"

    def open_session(
        self, client_id: str, clean_start: bool, conn: MqttConnection
    ) -> tuple[Session, bool]:
        """Attach `conn` to the client id's session; return it and "session present"."""
        timer = self._will_timers.pop(client_id, None)
        if timer is not None:
            timer.cancel()  # the client is back before its will delay ran out
        session = self.sessions.get(client_id)
        if session is not None and session.connection is not None:
            old = session.connection
            session.connection = None
            try:
                old.takeover()
            except Exception:  # the old socket's state must not cost the new client its login
                log.exception("closing the taken-over connection of %s failed", client_id)
            if session.will is not None:
                self.publish_will(session, session.will)
                session.will = None
            session.detach()
        if session is not None and (clean_start or session.expired(time.monotonic())):
            self.end_session(session)
            session = None
        present = session is not None
        if session is None:
            session = Session(client_id, self.settings.max_queued_messages)
            self.sessions[client_id] = session
        session.connection = conn
        session.disconnected_at = None
        return session, present

    def end_session(self, session: Session) -> None:
        """Forget a session and its subscriptions."""
        self.broker.drop_session(session)
        if self.sessions.get(session.client_id) is session:
            del self.sessions[session.client_id]

    def publish_will(self, session: Session, will: Will) -> None:
        """Publish a will now, or after its v5 Will Delay Interval."""
        # MQTT 5 3.1.3.2.2: the will goes out when the delay ends or the session ends,
        # whichever is first.
        delay = min(will.properties.will_delay_interval or 0, session.expiry_s)
        if delay:
            self._will_timers[session.client_id] = self.loop.call_later(
                delay, self._send_will, session, will
            )
        else:
            self._send_will(session, will)

    def _send_will(self, session: Session, will: Will) -> None:
        self._will_timers.pop(session.client_id, None)
        if not allowed(Principal(session.device), will.topic, "publish", self.settings.acl):
            self.stats.dropped_by_acl += 1
            return
        message = Publish(will.topic, will.payload, will.qos, will.retain)
        # The will's own properties minus Will Delay Interval, which PUBLISH cannot carry.
        message = copy_for(message, will.qos, will.retain, [], source=will.properties)
        self.broker.publish(message, session)
        for conn in self.connections:
            conn.flush_later()

    def expire_sessions(self) -> None:
        """Drop persistent sessions whose expiry passed."""
        now = time.monotonic()
        for session in list(self.sessions.values()):
            if session.expired(now):
                self.end_session(session)


def _limits(settings: MqttSettings) -> dict[str, Any]:
    """Session limits in ThingsBoard's `getSessionLimits` form ("capacity:seconds")."""
    rate = (
        ""
        if not settings.rate_limit
        else f"{settings.rate_burst}:{max(1, round(settings.rate_burst / settings.rate_limit))}"
    )
    return {
        "maxPayloadSize": settings.max_packet_size,
        "maxInflightMessages": settings.receive_maximum,
        "rateLimits": {"messages": rate, "telemetryMessages": rate, "telemetryDataPoints": ""},
    }


class MqttServer(Service):
    """Serves MQTT on `host:port` (and TLS on `tls_port` when configured)."""

    name = "mqtt"

    def __init__(
        self,
        host: str,
        settings: MqttSettings,
        registry: DeviceRegistry,
        ingest: TelemetryIngest,
        attributes: AttributeService,
        rpc: RpcService,
    ) -> None:
        self._host = host
        self._settings = settings
        self._device_api = DeviceApi(registry, ingest, attributes, rpc, _limits(settings))
        self._registry = registry
        self._servers: list[asyncio.Server] = []
        self._expiry_task: asyncio.Task[None] | None = None
        self.ctx: ServerContext | None = None
        self.port = settings.port
        self.tls_port = settings.tls_port

    async def start(self) -> None:
        from iotmesh.transports.mqtt.gateway import GatewayApi

        self.ctx = ServerContext(self._settings, self._registry, self._device_api)
        self._device_api.gateway = GatewayApi(self._device_api)
        loop = asyncio.get_running_loop()
        ctx = self.ctx
        sock = bind_tcp(self._host, self._settings.port, "mqtt")
        self.port = sock.getsockname()[1]
        self._servers.append(await loop.create_server(lambda: MqttConnection(ctx), sock=sock))
        if self._settings.tls_port is not None:
            tls = self._tls_context()
            tls_sock = bind_tcp(self._host, self._settings.tls_port, "mqtt tls")
            self.tls_port = tls_sock.getsockname()[1]
            self._servers.append(
                await loop.create_server(lambda: MqttConnection(ctx), sock=tls_sock, ssl=tls)
            )
        self._expiry_task = asyncio.create_task(self._expire_loop(), name="mqtt.session-expiry")

    def _tls_context(self) -> ssl.SSLContext:
        s = self._settings
        if s.certfile is None or s.keyfile is None:
            raise StartupError("mqtt.tls_port needs mqtt.certfile and mqtt.keyfile")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(s.certfile, s.keyfile)
            if s.cafile is not None:
                context.load_verify_locations(s.cafile)
                context.verify_mode = ssl.CERT_OPTIONAL
        except (OSError, ssl.SSLError) as exc:
            raise StartupError(f"mqtt tls: cannot load certificates: {exc}") from exc
        return context

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(10)
            if self.ctx is not None:
                self.ctx.expire_sessions()

    async def stop(self) -> None:
        if self._expiry_task is not None:
            self._expiry_task.cancel()
        for server in self._servers:
            server.close()
        ctx = self.ctx
        if ctx is None:
            return
        for conn in list(ctx.connections):
            if conn.transport is not None:
                conn.transport.pause_reading()
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        # Polling is fine here: it runs once, at shutdown, for at most DRAIN_TIMEOUT_S.
        while any(c.busy for c in ctx.connections) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        for conn in list(ctx.connections):
            conn.close(ReasonCode.SERVER_SHUTTING_DOWN, "server shutting down")
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()

    def health(self) -> Health:
        if self.ctx is None:
            return Health(ok=False, detail="not started")
        return Health(ok=True, detail=f"{self.ctx.stats.connections} connections")
