"""The MQTT server service: listeners, sessions, wills, and an orderly shutdown.

Resource handling: the listening sockets are bound in `start` (a busy port fails
start-up with one line), then the stored persistent sessions are loaded, then clients
are accepted. `stop` first stops accepting and reading, lets messages that are being
committed finish (their acks still go out), then closes every connection (v5 clients
get DISCONNECT 0x8B "server shutting down"); each persistent session is written to the
session store as its client leaves, and the store is closed last. What is stored when
is described in `persistence.py`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import ssl
import time
from collections.abc import Callable, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar

import msgspec

from iotmesh.commands.rpc import RpcService
from iotmesh.core.errors import StartupError
from iotmesh.core.lifecycle import Health, Service
from iotmesh.core.settings import MqttSettings
from iotmesh.devicestate import AttributeService, ConnectivityService
from iotmesh.pipeline.ingest import TelemetryIngest
from iotmesh.proto.mqtt import Connack, Publish, ReasonCode, Will, topic_matches
from iotmesh.proto.thingsboard import shared_update
from iotmesh.registry.service import DeviceRegistry
from iotmesh.storage.sessions import SessionStore
from iotmesh.transports.mqtt.auth import Principal, allowed
from iotmesh.transports.mqtt.broker import Broker
from iotmesh.transports.mqtt.connection import MqttConnection
from iotmesh.transports.mqtt.device_api import ATTRIBUTES, DeviceApi, json_payload
from iotmesh.transports.mqtt.persistence import SessionPersistence
from iotmesh.transports.mqtt.session import Session, copy_for
from iotmesh.transports.mqtt.stats import MqttStats
from iotmesh.transports.sockets import bind_tcp

if TYPE_CHECKING:
    from iotmesh.transports.mqtt.connection import AckSlot

log = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 5.0
LINGER_WAIT_S = 2.0  # at stop, how long closed connections may take to go


class ServerContext:
    """What every connection of one server shares."""

    def __init__(
        self,
        settings: MqttSettings,
        registry: DeviceRegistry,
        device_api: DeviceApi,
        store: SessionStore | None = None,
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
        self.persistence = (
            None
            if store is None
            else SessionPersistence(store, settings.max_queued_messages, self._watch_offline)
        )
        self.broker.keeper = self.persistence  # retained messages outlive a restart too
        self._connack_waits: set[MqttConnection] = set()  # a stored session was deleted
        self._offline_pushes: dict[str, Callable[[], None]] = {}  # by client id

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
            if session.stored:
                self._connack_waits.add(conn)
            self.end_session(session)
            session = None
        present = session is not None
        if session is None:
            session = Session(client_id, self.settings.max_queued_messages, self.persistence)
            self.sessions[client_id] = session
        session.connection = conn
        session.disconnected_at = None
        return session, present

    def end_session(self, session: Session) -> None:
        """Forget a session and its subscriptions (in the session store too)."""
        self.broker.drop_session(session)
        self._stop_offline_push(session)
        if self.persistence is not None:
            self.persistence.forget(session)
            session.keeper = None  # nothing of an ended session is written any more
        if self.sessions.get(session.client_id) is session:
            del self.sessions[session.client_id]

    # -- persistence ----------------------------------------------------------------------

    async def session_ready(self, conn: MqttConnection, session: Session) -> bool:
        """Store what a CONNECT made of its session; True when the CONNACK may go out.

        A persistent session is saved (a clean start that replaced a stored one deletes
        it first) and the CONNACK waits for that write. False: the connection was taken
        over or lost meanwhile, or the store failed (the client is refused).
        """
        session.version = conn.version
        persistence = self.persistence
        wait = conn in self._connack_waits
        self._connack_waits.discard(conn)
        if persistence is not None:
            if session.persistent:
                persistence.save(session)
                wait = True
            elif session.stored:  # resumed with expiry 0: it ends with this connection
                persistence.forget(session)
                wait = True
        if wait and persistence is not None:
            ok = await persistence.journal.flushed()
            if session.connection is not conn:
                return False
            if not ok:
                conn.send(Connack(False, ReasonCode.SERVER_UNAVAILABLE))
                conn.close()
                return False
        self._stop_offline_push(session)  # the connection's own pushes take over
        return True

    def after_session_change(self, conn: MqttConnection, answer: Callable[[], None]) -> None:
        """Call `answer` (SUBACK, UNSUBACK) once the changed session is stored."""
        session = conn.session
        if self.persistence is None or session is None or not session.persistent:
            answer()
            return
        self.persistence.save(session)
        self.persistence.journal.after_write(partial(_answer_stored, conn, session, answer))

    def route(self, conn: MqttConnection, packet: Publish, slot: AckSlot | None) -> None:
        """Relay a client's message to subscribers; ack it once it is safe.

        Copies queued for offline persistent sessions, and a retained message (or the
        clearing of one), are written to the session store first: the publisher's
        PUBACK (PUBREC) means they survive a crash.
        """
        journal = None if self.persistence is None else self.persistence.journal
        before = 0 if journal is None else journal.added
        count = self.broker.publish(packet, conn.session)
        reason = ReasonCode.SUCCESS if count else ReasonCode.NO_MATCHING_SUBSCRIBERS
        if slot is None or journal is None or journal.added == before:
            conn.complete(slot, reason)
            return
        journal.after_write(partial(_ack_stored, conn, slot, reason))

    async def restore_sessions(self) -> None:
        """Load the stored persistent sessions as offline sessions, subscribed again,
        and the stored retained messages."""
        if self.persistence is None:
            return
        await self.persistence.restore_retained(self.broker)
        for session in await self.persistence.restore(self.registry):
            self.sessions[session.client_id] = session
            for topic_filter, entry in session.subscriptions.items():
                if not self.device_api.handles(topic_filter):
                    self.broker.subscribe(session, topic_filter, entry)
            self._watch_offline(session)

    async def close_persistence(self) -> None:
        """Store the sessions whose client is still attached, write everything, stop."""
        for session in list(self.sessions.values()):
            if session.connection is not None:
                session.detach()  # shutting down: the connection is being closed anyway
        for undo in self._offline_pushes.values():
            undo()
        self._offline_pushes.clear()
        if self.persistence is not None:
            await self.persistence.journal.close()

    def _watch_offline(self, session: Session) -> None:
        """While a persistent device session is offline, queue its shared attribute pushes.

        Online, the connection's own push (device_api) sends them; offline they are
        queued like any QoS 1/2 message (and stored), so a device that returns with its
        session gets the changes it missed.
        """
        device = session.device
        if device is None or session.client_id in self._offline_pushes:
            return
        if _granted_qos(session, ATTRIBUTES) is None:
            return

        async def push(changed: dict[str, Any], deleted: list[str]) -> None:
            qos = _granted_qos(session, ATTRIBUTES)
            if qos is None:
                return
            session.deliver(Publish(ATTRIBUTES, json_payload(shared_update(changed, deleted)), qos))
            if self.persistence is not None:
                await self.persistence.journal.flushed()  # the REST call returns after it

        self._offline_pushes[session.client_id] = self.device_api.attributes.listen_shared(
            device.id, push
        )

    def _stop_offline_push(self, session: Session) -> None:
        undo = self._offline_pushes.pop(session.client_id, None)
        if undo is not None:
            undo()

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
        """Drop persistent sessions and retained messages whose expiry passed."""
        now = time.monotonic()
        self.broker.expire_retained(now)
        for session in list(self.sessions.values()):
            if session.expired(now):
                self.end_session(session)


def _granted_qos(session: Session, topic: str) -> int | None:
    """The highest QoS of the session's subscriptions matching `topic`, None if none."""
    granted = [e.options.qos for f, e in session.subscriptions.items() if topic_matches(f, topic)]
    return max(granted) if granted else None


def _answer_stored(
    conn: MqttConnection, session: Session, answer: Callable[[], None], ok: bool
) -> None:
    if session.connection is not conn:
        return  # the client left before its session was stored: nobody to answer
    if ok:
        answer()
    else:
        conn.close(ReasonCode.UNSPECIFIED_ERROR, "the session could not be stored")


def _ack_stored(conn: MqttConnection, slot: AckSlot, reason: ReasonCode, ok: bool) -> None:
    if ok:
        conn.complete(slot, reason)
    elif conn.version == 5:
        conn.complete(slot, ReasonCode.UNSPECIFIED_ERROR)
    else:
        conn.close()  # v3.1.1 has no negative PUBACK: the client sends it again


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
    stats_counters = frozenset(
        {
            "connections_total",
            "auth_failures",
            "messages_in",
            "messages_out",
            "bytes_in",
            "dropped_by_acl",
            "protocol_errors",
            "telemetry_batches",
            "queue_dropped",
        }
    )
    stats_labels: ClassVar[Mapping[str, str]] = {"messages_in": "qos"}

    def __init__(
        self,
        host: str,
        settings: MqttSettings,
        registry: DeviceRegistry,
        ingest: TelemetryIngest,
        attributes: AttributeService,
        rpc: RpcService,
        sessions: SessionStore | None = None,
        connectivity: ConnectivityService | None = None,
    ) -> None:
        """`sessions`: where persistent sessions outlive a restart (None: memory only);
        the server opens and closes it. `connectivity`: told of every device connection,
        its end, and its uploads."""
        self._host = host
        self._sessions_store = sessions
        self._settings = settings
        self._device_api = DeviceApi(
            registry, ingest, attributes, rpc, _limits(settings), connectivity
        )
        self._registry = registry
        self._servers: list[asyncio.Server] = []
        self._expiry_task: asyncio.Task[None] | None = None
        self.ctx: ServerContext | None = None
        self.port = settings.port
        self.tls_port = settings.tls_port

    async def start(self) -> None:
        from iotmesh.transports.mqtt.gateway import GatewayApi

        store = self._sessions_store
        self.ctx = ServerContext(self._settings, self._registry, self._device_api, store)
        self._device_api.gateway = GatewayApi(self._device_api)
        loop = asyncio.get_running_loop()
        ctx = self.ctx
        # Under overload a client's data should wait on its side, where it shows (its
        # writes block), not in an autotuned megabytes-large buffer of ours.
        rcvbuf = self._settings.socket_receive_buffer
        sock = bind_tcp(self._host, self._settings.port, "mqtt", receive_buffer=rcvbuf)
        self.port = sock.getsockname()[1]
        tls_sock = tls = None
        try:
            if self._settings.tls_port is not None:
                tls = self._tls_context()
                tls_sock = bind_tcp(
                    self._host, self._settings.tls_port, "mqtt tls", receive_buffer=rcvbuf
                )
                self.tls_port = tls_sock.getsockname()[1]
            if store is not None and ctx.persistence is not None:
                await store.open()
                ctx.persistence.journal.start()
                try:
                    await ctx.restore_sessions()
                except BaseException:
                    await ctx.close_persistence()
                    await store.close()
                    raise
        except BaseException:
            sock.close()
            if tls_sock is not None:
                tls_sock.close()
            raise
        self._servers.append(await loop.create_server(lambda: MqttConnection(ctx), sock=sock))
        if tls_sock is not None:
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
        if self._sessions_store is None:
            return
        # Each persistent session is stored as its connection goes (v5 ones linger a
        # little after the DISCONNECT); whatever is still attached after that is stored
        # by close_persistence.
        deadline = time.monotonic() + LINGER_WAIT_S
        while ctx.connections and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        await ctx.close_persistence()
        await self._sessions_store.close()

    def stats(self) -> dict[str, Any]:
        ctx = self.ctx
        if ctx is None:
            return {}
        sessions = ctx.sessions.values()
        return {
            **msgspec.structs.asdict(ctx.stats),
            "incoming_unacked": sum(c.unacked_in for c in ctx.connections),
            "input_buffered_bytes": sum(c.reader.buffered for c in ctx.connections),
            "sessions": len(ctx.sessions),
            "queued_messages": sum(len(s.queue) for s in sessions),
            "inflight_messages": sum(len(s.inflight) for s in sessions),
            "queue_dropped": sum(s.dropped for s in sessions),
        }

    def health(self) -> Health:
        if self.ctx is None:
            return Health(ok=False, detail="not started")
        return Health(ok=True, detail=f"{self.ctx.stats.connections} connections")
