"""One MQTT client connection: an asyncio Protocol driving the sans-IO codec.

Why a Protocol and not streams: `data_received` gets every byte the socket had, the
reader turns it into packets, and the answers (PUBACKs above all) leave in one
`writelines`. That batching is most of the server's speed.

Order and durability: every QoS 1/2 PUBLISH gets a slot in `_acks`, in arrival order.
A slot is completed when its message is handled; for telemetry and attributes that is
after the commit. Acks leave only from the head of the queue, so they are sent in the
order the PUBLISHes came (MQTT 4.6) and never before the data is durable.

Back-pressure: reading pauses, for one of the reasons in `_paused`, when `_acks` holds
`receive_maximum` unfinished messages, when `MAX_SUBMITS` telemetry batches or
`MAX_TELEMETRY_HELD` telemetry messages (QoS 0 included) are in the pipeline, while a
client is over its rate limit, and while its CONNECT is handled. A pause takes effect at
once, between two packets: the socket is not read, and the packets of the last read not
yet handled stay unparsed in the reader (asyncio reads up to 256 KiB at once: thousands
of small PUBLISHes, which a v3.1.1 client, having no Receive Maximum, may well send
without waiting). When every reason is gone, those buffered packets are handled first,
on the next loop turn, and only then is the socket read again; so packets are handled in
the order they came, and a connection holds at most one read of bytes beyond its limits.

One exception: a v5 client must not exceed our Receive Maximum (MQTT 5 3.3.4), so for
it the ack limit pauses the socket but not the packets already read: the rest of that
read is handled at once, and a PUBLISH over the limit gets DISCONNECT 0x93. "Over" is
judged as if we acked on receipt (`_over_receive_maximum`): our acks wait for a commit
(Mosquitto acks a relayed message at once), and a client that sends a short burst (the
Paho interoperability client sends 4 messages against a Receive Maximum of 2 without
waiting) would otherwise be cut off for our slowness, not its own.

Error handling: a malformed packet ends the connection (v5: DISCONNECT 0x81 first);
a packet over `max_packet_size` gets 0x95; protocol breaches 0x82 or their specific
code. The error is counted and logged; other connections are not affected.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from iotmesh.core.types import Device
from iotmesh.proto.mqtt import (
    Auth,
    Connack,
    Connect,
    Disconnect,
    InvalidTopic,
    MqttError,
    MqttReader,
    Packet,
    Pingreq,
    Pingresp,
    Properties,
    ProtocolError,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    ReasonCode,
    Suback,
    Subscribe,
    Unsuback,
    Unsubscribe,
    UnsupportedProtocolVersion,
    encode,
    parse_shared,
    validate_topic_filter,
)
from iotmesh.transports.mqtt.auth import LoginRefused, Principal, allowed, authenticate
from iotmesh.transports.mqtt.broker import granted_copy
from iotmesh.transports.mqtt.session import (
    NOTHING_YET,
    Session,
    SubscriptionEntry,
    copy_for,
    own_queue,
)

if TYPE_CHECKING:
    from iotmesh.transports.mqtt.server import ServerContext

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0
MAX_SUBMITS = 8  # telemetry batches (socket reads) of one connection in the pipeline at once
# (at 2, a device sending a message every ~50 ms was paused and resumed on most reads:
# two epoll_ctl calls each, ~20% of the loop, and its data waited in the kernel meanwhile)
# Telemetry messages of one connection parsed and not yet committed. QoS 0 has no acks
# to count, so this is what bounds what a flooding client makes the server hold
# (MAX_SUBMITS alone let 1000 flooding clients grow the server to 2.7 GB).
MAX_TELEMETRY_HELD = 128
LINGER_S = 0.5
RECEIVE_MAXIMUM_SLACK = 2  # see the module docstring

# Why reading is paused (bits of `MqttConnection._paused`).
PAUSED_ACKS = 1  # receive_maximum incoming QoS 1/2 messages not yet acknowledged
PAUSED_SUBMITS = 2  # MAX_SUBMITS telemetry batches or MAX_TELEMETRY_HELD messages held
PAUSED_RATE = 4  # over the rate limit: until the token bucket has refilled
PAUSED_CONNECT = 8  # CONNECT is being handled
PAUSED_CLOSE = 16  # closing (lingering after a v5 DISCONNECT): never resumed


class AckSlot:
    """The acknowledgement owed for one incoming QoS 1/2 PUBLISH."""

    __slots__ = ("done", "packet_id", "qos", "reason")

    def __init__(self, packet_id: int, qos: int) -> None:
        self.packet_id = packet_id
        self.qos = qos
        self.reason = ReasonCode.SUCCESS
        self.done = False


class MqttConnection(asyncio.Protocol):
    """Protocol instance for one TCP (or TLS) connection."""

    # Slots, not a __dict__: ~1.5 KB less per connection (10,000 idle clients: ~15 MB).
    __slots__ = (
        "_acks",
        "_aliases",
        "_closing",
        "_corked",
        "_draining",
        "_eof",
        "_graceful",
        "_holds",
        "_out",
        "_out_aliases",
        "_paused",
        "_qos2_unacked",
        "_rate_timer",
        "_resume_handle",
        "_submits",
        "_tasks",
        "_telemetry_held",
        "_timer",
        "_tokens",
        "_tokens_at",
        "_transport_paused",
        "_writing_paused",
        "client_alias_max",
        "client_certificate",
        "client_max_packet",
        "client_receive_max",
        "ctx",
        "gateway_children",
        "keep_alive",
        "last_rx",
        "pending_telemetry",
        "principal",
        "pushes",
        "reader",
        "session",
        "state",
        "transport",
        "version",
    )

    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx
        settings = ctx.settings
        self.reader = MqttReader(settings.max_packet_size)
        self.transport: asyncio.Transport | None = None
        self.version = 4
        self.session: Session | None = None
        self.principal = Principal(None)
        self.state = "new"  # new → connecting → connected → closed
        self.keep_alive = 0
        self.last_rx = time.monotonic()
        self.client_receive_max = 65535
        self.client_max_packet: int | None = None
        self.client_alias_max = 0  # topic aliases the client lets us use (v5)
        self._out_aliases: dict[str, int] = {}
        self._aliases: dict[int, str] = {}
        self._acks: collections.deque[AckSlot] = NOTHING_YET  # own_queue() before adding
        self._out: list[bytes] = []
        self._corked = False
        self._paused = 0  # PAUSED_* bits: why packets wait and the socket is not read
        self._holds = -1  # the bits that keep buffered packets waiting (v5: not acks)
        self._transport_paused = False  # transport.pause_reading() is in effect
        self._draining = False  # in `_receive`: it resumes or pauses the socket at its end
        self._resume_handle: asyncio.Handle | None = None  # `_receive` of buffered packets
        self._rate_timer: asyncio.TimerHandle | None = None
        self._writing_paused = False
        self._graceful = False
        self._closing = False  # close() was called: handle no more packets
        self._eof = False  # our side of the socket is shut: write nothing more
        # Tasks of this connection, each with whether it runs on after the connection
        # ends (None when there are none: an idle client keeps none after its CONNECT,
        # and an empty container per client adds up).
        self._tasks: dict[asyncio.Task[Any], bool] | None = None
        self._submits = 0  # telemetry submits in flight
        self._telemetry_held = 0  # telemetry messages parsed, not yet committed
        self._qos2_unacked = 0  # QoS 2 slots in `_acks` (PUBREC not sent yet)
        self._timer: asyncio.TimerHandle | None = None
        self._tokens = float(settings.rate_burst)
        self._tokens_at = time.monotonic()
        self.pending_telemetry: list[Any] = []  # filled by the device API per read
        self.client_certificate: bytes | None = None  # DER, from a TLS client
        # Device-API pushes set up for this client, by kind, with the function undoing each.
        self.pushes: dict[str, Callable[[], None]] = {}
        self.gateway_children: dict[str, Device] = {}  # devices a gateway spoke for, by name

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        tls = transport.get_extra_info("ssl_object")
        if tls is not None:
            self.client_certificate = tls.getpeercert(binary_form=True)
        self.ctx.connections.add(self)
        self.ctx.stats.connections += 1
        self.ctx.stats.connections_total += 1
        self._timer = self.ctx.loop.call_later(CONNECT_TIMEOUT_S, self._connect_timeout)

    def data_received(self, data: bytes) -> None:
        self.last_rx = time.monotonic()
        self.ctx.stats.bytes_in += len(data)
        if self._closing:
            return  # nothing more is handled: do not buffer it either
        self.reader.feed(data)
        self._receive()

    def connection_lost(self, exc: Exception | None) -> None:
        previous, self.state = self.state, "closed"
        self.ctx.connections.discard(self)
        self.ctx.stats.connections -= 1
        for handle in (self._timer, self._resume_handle, self._rate_timer):
            if handle is not None:
                handle.cancel()
        for task, runs_on in (self._tasks or {}).items():
            if not runs_on:
                task.cancel()
        session = self.session
        if session is None or session.connection is not self:
            # Taken over (or refused while its session was stored): the session lives
            # on with another connection, but this one's pushes and presence end here.
            self.ctx.device_api.on_disconnect(self)
            return
        will, session.will = session.will, None
        session.detach()
        self.ctx.device_api.on_disconnect(self)
        if not session.persistent:
            self.ctx.end_session(session)
        if previous == "connected" and not self._graceful and will is not None:
            self.ctx.publish_will(session, will)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self.session is not None:
            self.session.pump()
            self._flush()

    # -- sending --------------------------------------------------------------------------

    def send(self, packet: Packet) -> None:
        """Queue a packet for the socket (written at the end of the current batch)."""
        if self.state == "closed" or self.transport is None:
            return
        self._out.append(encode(packet, self.version))
        if not self._corked:
            self._flush()

    def send_publish(self, message: Publish) -> bool:
        """Send a message the session routed to this client; False if it was discarded.

        MQTT 3.1.2.25: a message over the client's Maximum Packet Size is discarded (the
        caller then forgets it, as if acknowledged). Its size is checked before a topic
        alias is given out, so an alias is never set by a message that was not sent.
        """
        limit = self.client_max_packet
        if limit is not None and len(encode(message, self.version)) > limit:
            return False
        if self.client_alias_max:
            aliased = self._with_alias(message)
            if limit is not None and len(encode(aliased, self.version)) > limit:
                # The alias property made it too large: send it without, alias unset.
                if aliased is not message and aliased.topic:
                    self._out_aliases.pop(message.topic, None)
                aliased = message
            message = aliased
        self.ctx.stats.messages_out += 1
        self.send(message)
        return True

    def _with_alias(self, message: Publish) -> Publish:
        """Use a v5 topic alias towards a client that allows them: the first message
        on a topic sets the alias, later ones send it with an empty topic name."""
        alias = self._out_aliases.get(message.topic)
        topic = ""
        if alias is None:
            if len(self._out_aliases) >= self.client_alias_max:
                return message
            alias = len(self._out_aliases) + 1
            self._out_aliases[message.topic] = alias
            topic = message.topic
        ids = list(message.properties.subscription_identifiers)
        props = copy_for(message, message.qos, message.retain, ids, source=message.properties)
        props.properties.topic_alias = alias
        return Publish(
            topic,
            message.payload,
            message.qos,
            message.retain,
            message.dup,
            message.packet_id,
            props.properties,
        )

    def can_send(self, inflight: int) -> bool:
        """Whether another QoS 1/2 message may go out now."""
        if self._writing_paused or self.state != "connected":
            return False
        return inflight < min(self.client_receive_max, self.ctx.settings.max_inflight)

    def _flush(self) -> None:
        if (
            self._out
            and self.transport is not None
            and not self._eof
            and not self.transport.is_closing()
        ):
            self.transport.writelines(self._out)
        self._out = []

    def close(self, reason: ReasonCode | None = None, message: str = "") -> None:
        """End the connection; v5 clients get a DISCONNECT with `reason` first."""
        if self.state == "closed" or self.transport is None or self._closing:
            return
        self._closing = True
        if reason is not None and self.version == 5 and self.state == "connected":
            props = Properties(reason_string=message[:200]) if message else Properties()
            self.send(Disconnect(reason, props))
            self._flush()
            # Linger: the client may still be sending (e.g. PUBRELs) and must get to read
            # the DISCONNECT instead of a broken pipe. Our side is finished; the socket is
            # closed shortly after, whatever the client does.
            self._pause_reading(PAUSED_CLOSE)
            self._eof = True
            with contextlib.suppress(OSError):
                if self.transport.can_write_eof():
                    self.transport.write_eof()
            self.ctx.loop.call_later(LINGER_S, self.transport.close)
            return
        self.transport.close()

    def fail(self, exc: MqttError) -> None:
        """The client broke the protocol: count, log, disconnect."""
        self.ctx.stats.protocol_errors += 1
        reason = getattr(exc, "reason_code", ReasonCode.PROTOCOL_ERROR)
        log.info("mqtt %s: %s (reason 0x%02x)", self._who(), exc, reason)
        if isinstance(exc, UnsupportedProtocolVersion) and self.state == "new":
            self.version = 4
            self.send(Connack(False, ReasonCode.UNSUPPORTED_PROTOCOL_VERSION))
            self._flush()
            if self.transport is not None:
                self.transport.close()
            return
        self.close(ReasonCode(reason), str(exc))

    @property
    def session_id(self) -> str:
        """The client id, for logs."""
        return self.session.client_id if self.session else "(connecting)"

    def _who(self) -> str:
        return self.session_id

    # -- acknowledgements -----------------------------------------------------------------

    def ack_slot(self, packet: Publish) -> AckSlot | None:
        """Reserve the ack of a QoS 1/2 PUBLISH in arrival order (None for QoS 0)."""
        if packet.qos == 0 or packet.packet_id is None:
            return None
        slot = AckSlot(packet.packet_id, packet.qos)
        acks = self._acks = own_queue(self._acks)
        acks.append(slot)
        if packet.qos == 2:
            self._qos2_unacked += 1
        stats = self.ctx.stats
        if len(acks) > stats.incoming_unacked_peak:
            stats.incoming_unacked_peak = len(acks)
        if len(acks) >= self.ctx.settings.receive_maximum:
            self._pause_reading(PAUSED_ACKS)
        return slot

    def complete(self, slot: AckSlot | None, reason: ReasonCode = ReasonCode.SUCCESS) -> None:
        """The message of `slot` is handled; send every ack that is now due, in order."""
        if slot is None:
            return
        slot.reason = reason
        slot.done = True
        acks = self._acks
        sent = False
        while acks and acks[0].done:
            head = acks.popleft()
            sent = True
            if head.qos == 1:
                self._out.append(encode(Puback(head.packet_id, head.reason), self.version))
            else:
                self._qos2_unacked -= 1
                if head.reason < 0x80 and self.session is not None:
                    self.session.incoming_qos2.add(head.packet_id)
                self._out.append(encode(Pubrec(head.packet_id, head.reason), self.version))
        if sent and not self._corked:
            self._flush()
        if self._paused & PAUSED_ACKS and len(acks) <= self.ctx.settings.receive_maximum // 2:
            self._resume_reading(PAUSED_ACKS)

    def complete_all(self, slots: list[AckSlot | None]) -> None:
        """Complete several slots with one socket write for all their acks."""
        corked, self._corked = self._corked, True
        try:
            for slot in slots:
                self.complete(slot)
        finally:
            self._corked = corked
        if not corked:
            self._flush()

    def _pause_reading(self, reason: int) -> None:
        """Handle no further packet (see the module docstring) and stop reading."""
        self._paused |= reason
        if not self._draining:
            self._sync_transport()
        # else: `_receive` pauses the socket when it ends (asyncio calls no other
        # `data_received` before), so a pause lifted within one read costs no syscall.

    def _resume_reading(self, reason: int) -> None:
        """`reason` is gone; once no reason is left, handle the buffered packets, then
        read the socket again."""
        if not self._paused & reason:
            return
        self._paused &= ~reason
        if self._paused or self._draining or self.state == "closed":
            return  # still paused; or the `_receive` under way goes on with the packets
        if self.reader.buffered:
            # Not here: this may run inside another component's callback (e.g. in the
            # middle of `complete_all`); and not the socket first, or order is lost.
            if self._resume_handle is None:
                self._resume_handle = self.ctx.loop.call_soon(self._receive_buffered)
        else:
            self._sync_transport()

    def _sync_transport(self) -> None:
        """Pause or resume the socket to match `_paused`."""
        transport = self.transport
        if transport is None or self.state == "closed":
            return
        paused = bool(self._paused)
        if paused != self._transport_paused:
            self._transport_paused = paused
            if paused:
                transport.pause_reading()
            else:
                transport.resume_reading()

    def spawn(self, coro: Any, name: str, *, finish_after_close: bool = False) -> None:
        """Run work owned by this connection.

        It is cancelled when the connection closes, unless `finish_after_close`: data
        handed to the pipeline is stored even if its client vanished meanwhile.
        """
        task = self.ctx.loop.create_task(coro, name=f"mqtt.{self._who()}.{name}")
        self._tasks = self._tasks or {}
        self._tasks[task] = finish_after_close
        task.add_done_callback(self._task_done)

    def hold_telemetry(self, message: Any) -> None:
        """Keep a parsed telemetry message for this read's submit; at
        `MAX_TELEMETRY_HELD` held, handle no more packets and stop reading."""
        self.pending_telemetry.append(message)
        self._telemetry_held += 1
        if self._telemetry_held >= MAX_TELEMETRY_HELD:
            self._pause_reading(PAUSED_SUBMITS)

    def submit_started(self) -> None:
        """A telemetry submit began: past `MAX_SUBMITS` in flight, stop reading."""
        self._submits += 1
        if self._submits >= MAX_SUBMITS:
            self._pause_reading(PAUSED_SUBMITS)

    def submit_finished(self, messages: int) -> None:
        """A submit of `messages` telemetry messages is committed (or failed)."""
        self._submits -= 1
        self._telemetry_held -= messages
        if (
            self._paused & PAUSED_SUBMITS
            and self._submits < MAX_SUBMITS // 2
            and self._telemetry_held <= MAX_TELEMETRY_HELD // 2
        ):
            self._resume_reading(PAUSED_SUBMITS)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        if self._tasks is not None:
            self._tasks.pop(task, None)
            self._tasks = self._tasks or None
        if not task.cancelled() and task.exception() is not None:
            log.error("mqtt %s: task failed", self._who(), exc_info=task.exception())
            self.close(ReasonCode.IMPLEMENTATION_SPECIFIC_ERROR, "internal error")

    # -- incoming packets -----------------------------------------------------------------

    def _receive(self) -> None:
        """Handle the buffered packets until none is left or reading is paused; hand
        their telemetry to the pipeline, write the answers, then pause or resume the
        socket."""
        self._resume_handle = None
        if self.state == "closed" or self._closing:
            return
        self._corked = self._draining = True
        try:
            while True:
                drained = self._drain_reader()
                if self.pending_telemetry:
                    self.ctx.device_api.flush_telemetry(self)
                # A pause lifted meanwhile (an ack sent from the flush) lets the packets
                # left in the reader go on now: no socket read would bring them back.
                if drained or self._paused & self._holds or self._closing or self.state == "closed":
                    break
        finally:
            self._corked = self._draining = False
        self._flush()
        self._sync_transport()

    def _receive_buffered(self) -> None:
        """`_receive` called by the loop, not by the transport: a bug in it must end the
        connection, as asyncio does for `data_received`, not leave it paused for good."""
        try:
            self._receive()
        except Exception:
            log.exception("mqtt %s: handling buffered packets failed", self._who())
            self.close(ReasonCode.IMPLEMENTATION_SPECIFIC_ERROR, "internal error")

    def _drain_reader(self) -> bool:
        """Handle packets until a pause; True if the reader has no whole packet left."""
        # One packet at a time (`next_packet`), so that a pause leaves the rest unparsed.
        reader = self.reader
        while not self._paused & self._holds and not self._closing and self.state != "closed":
            try:
                packet = reader.next_packet()
            except MqttError as exc:
                self.fail(exc)
                return True
            if packet is None:
                return True
            self._handle(packet)
        return False

    def _handle(self, packet: Packet) -> None:
        try:
            if self.state == "new":
                if not isinstance(packet, Connect):
                    raise ProtocolError("the first packet must be CONNECT")
                self.state = "connecting"
                self._pause_reading(PAUSED_CONNECT)  # what follows CONNECT waits for it
                self.spawn(self._on_connect(packet), "connect")
                return
            handler = self._handlers.get(type(packet))
            if handler is None:
                raise ProtocolError(f"unexpected {type(packet).__name__} from a client")
            handler(self, packet)
        except MqttError as exc:
            self.fail(exc)

    def _on_publish(self, packet: Publish) -> None:
        stats = self.ctx.stats
        stats.messages_in[packet.qos] += 1
        if packet.qos == 2 and packet.packet_id in self._incoming_qos2():
            self.send(Pubrec(packet.packet_id))  # a resent QoS 2 message: already handled
            return
        self._resolve_alias(packet)
        if self.ctx.settings.rate_limit:
            self._rate_limit()
        if packet.qos and self.version == 5 and self._over_receive_maximum():
            raise ProtocolError(
                "more unacknowledged QoS 1/2 messages than the receive maximum",
                reason_code=ReasonCode.RECEIVE_MAXIMUM_EXCEEDED,
            )
        slot = self.ack_slot(packet)
        topic = packet.topic
        if not allowed(self.principal, topic, "publish", self.ctx.settings.acl):
            stats.dropped_by_acl += 1
            log.info("mqtt %s: publish to %r refused by ACL", self._who(), topic)
            self.complete(slot, ReasonCode.NOT_AUTHORIZED)
            return
        if self.ctx.device_api.handles(topic):
            self.ctx.device_api.on_publish(self, packet, slot)
            return
        self.ctx.route(self, packet, slot)  # acked once copies for offline sessions are stored

    def _unfinished(self) -> int:
        """Incoming QoS 1/2 messages not yet finished (no PUBACK / PUBCOMP sent)."""
        return len(self._acks) + len(self._incoming_qos2())

    def _over_receive_maximum(self) -> bool:
        """Whether a v5 client's next QoS 1/2 PUBLISH breaks our Receive Maximum.

        Judged as if we acknowledged on receipt, as brokers that ack without a commit do
        (see the module docstring): QoS 2 messages still wait for the client's PUBREL,
        QoS 1 ones would be done. So a client that keeps QoS 2 messages open past the
        limit is refused at once; acks that are late because of our commits count only
        past `RECEIVE_MAXIMUM_SLACK` times the limit.
        """
        limit = self.ctx.settings.receive_maximum
        open_qos2 = self._qos2_unacked + len(self._incoming_qos2())
        return open_qos2 >= limit or self._unfinished() >= RECEIVE_MAXIMUM_SLACK * limit

    def _incoming_qos2(self) -> set[int]:
        return self.session.incoming_qos2 if self.session is not None else set()

    def _resolve_alias(self, packet: Publish) -> None:
        alias = packet.properties.topic_alias
        if alias is None:
            if not packet.topic:
                raise ProtocolError("empty topic without a topic alias")
            return
        if self.version != 5 or not 0 < alias <= self.ctx.settings.topic_alias_maximum:
            raise ProtocolError(
                f"topic alias {alias} is out of range", reason_code=ReasonCode.TOPIC_ALIAS_INVALID
            )
        if packet.topic:
            self._aliases[alias] = packet.topic
        elif alias in self._aliases:
            packet.topic = self._aliases[alias]
        else:
            raise ProtocolError(f"topic alias {alias} was never set")

    def _rate_limit(self) -> None:
        rate = self.ctx.settings.rate_limit
        now = time.monotonic()
        burst = self.ctx.settings.rate_burst
        self._tokens = min(burst, self._tokens + (now - self._tokens_at) * rate)
        self._tokens_at = now
        self._tokens -= 1
        if self._tokens < 0 and self._rate_timer is None:
            # Over the limit: take no more packets until the bucket has refilled (slow,
            # never drop).
            self._pause_reading(PAUSED_RATE)
            self._rate_timer = self.ctx.loop.call_later(-self._tokens / rate, self._refilled)

    def _refilled(self) -> None:
        self._rate_timer = None
        self._resume_reading(PAUSED_RATE)

    def _on_puback(self, packet: Puback) -> None:
        if self.session is not None:
            self.session.acknowledged(packet.packet_id)

    def _on_pubrec(self, packet: Pubrec) -> None:
        if self.session is not None and packet.reason_code >= 0x80:
            self.session.acknowledged(packet.packet_id)  # the receiver refused it: done
        elif self.session is not None and self.session.received(packet.packet_id):
            self.send(Pubrel(packet.packet_id))
        else:
            self.send(Pubrel(packet.packet_id, ReasonCode.PACKET_IDENTIFIER_NOT_FOUND))

    def _on_pubrel(self, packet: Pubrel) -> None:
        known = self._incoming_qos2()
        if packet.packet_id in known:
            known.discard(packet.packet_id)
            self.send(Pubcomp(packet.packet_id))
        else:
            self.send(Pubcomp(packet.packet_id, ReasonCode.PACKET_IDENTIFIER_NOT_FOUND))

    def _on_pubcomp(self, packet: Pubcomp) -> None:
        if self.session is not None:
            self.session.acknowledged(packet.packet_id)

    def _on_subscribe(self, packet: Subscribe) -> None:
        session = self.session
        assert session is not None
        ids = packet.properties.subscription_identifiers
        identifier = ids[0] if ids else None
        codes: list[ReasonCode] = []
        retained: list[Publish] = []
        for sub in packet.subscriptions:
            code, messages = self._subscribe_one(session, sub, identifier)
            codes.append(code)
            retained.extend(messages)

        def answer() -> None:
            self.send(Suback(packet.packet_id, codes))
            for message in retained:
                session.deliver(message)

        self.ctx.after_session_change(self, answer)  # a persistent session is stored first

    def _subscribe_one(
        self, session: Session, sub: Any, identifier: int | None
    ) -> tuple[ReasonCode, list[Publish]]:
        topic_filter = sub.topic_filter
        try:
            validate_topic_filter(topic_filter)
        except InvalidTopic:
            return ReasonCode.TOPIC_FILTER_INVALID, []
        shared = parse_shared(topic_filter)
        if shared is not None and sub.no_local:
            raise ProtocolError("no local is not allowed on a shared subscription")
        if not allowed(self.principal, topic_filter, "subscribe", self.ctx.settings.acl):
            self.ctx.stats.dropped_by_acl += 1
            return ReasonCode.UNSPECIFIED_ERROR, []
        qos = min(sub.qos, 2)
        granted = type(sub)(
            topic_filter, qos, sub.no_local, sub.retain_as_published, sub.retain_handling
        )
        entry = SubscriptionEntry(granted, identifier, shared.group if shared else None)
        new = topic_filter not in session.subscriptions
        session.subscriptions[topic_filter] = entry
        if self.ctx.device_api.handles(topic_filter):
            self.ctx.device_api.on_subscribe(self, topic_filter)
            return ReasonCode(qos), []
        self.ctx.broker.subscribe(session, topic_filter, entry)
        if sub.retain_handling == 2 or (sub.retain_handling == 1 and not new):
            return ReasonCode(qos), []
        messages = [
            granted_copy(m, granted, identifier)
            for m in self.ctx.broker.retained_for_session(session, topic_filter)
        ]
        return ReasonCode(qos), messages

    def _on_unsubscribe(self, packet: Unsubscribe) -> None:
        session = self.session
        assert session is not None
        codes = []
        for topic_filter in packet.topic_filters:
            existed = session.subscriptions.pop(topic_filter, None) is not None
            if self.ctx.device_api.handles(topic_filter):
                self.ctx.device_api.on_unsubscribe(self)
            else:
                self.ctx.broker.unsubscribe(session, topic_filter)
            codes.append(ReasonCode.SUCCESS if existed else ReasonCode.NO_SUBSCRIPTION_EXISTED)
        self.ctx.after_session_change(self, lambda: self.send(Unsuback(packet.packet_id, codes)))

    def _on_pingreq(self, packet: Pingreq) -> None:
        self.send(Pingresp())

    def _on_disconnect(self, packet: Disconnect) -> None:
        session = self.session
        if session is not None:
            expiry = packet.properties.session_expiry_interval
            if expiry is not None:
                if session.expiry_s == 0 and expiry > 0:
                    raise ProtocolError("session expiry cannot be set after a zero one")
                session.expiry_s = min(expiry, self.ctx.settings.max_session_expiry_s)
            if packet.reason_code != ReasonCode.DISCONNECT_WITH_WILL_MESSAGE:
                session.will = None
                self._graceful = True
        if self.transport is not None:
            self.transport.close()

    def _on_auth(self, packet: Auth) -> None:
        raise ProtocolError(
            "enhanced authentication is not supported",
            reason_code=ReasonCode.BAD_AUTHENTICATION_METHOD,
        )

    def _on_second_connect(self, packet: Connect) -> None:
        raise ProtocolError("a second CONNECT on one connection")

    _handlers: ClassVar[dict[type, Any]] = {
        Publish: _on_publish,
        Puback: _on_puback,
        Pubrec: _on_pubrec,
        Pubrel: _on_pubrel,
        Pubcomp: _on_pubcomp,
        Subscribe: _on_subscribe,
        Unsubscribe: _on_unsubscribe,
        Pingreq: _on_pingreq,
        Disconnect: _on_disconnect,
        Auth: _on_auth,
        Connect: _on_second_connect,
    }

    # -- CONNECT --------------------------------------------------------------------------

    async def _on_connect(self, packet: Connect) -> None:
        ctx = self.ctx
        self.version = packet.protocol_level
        props = packet.properties
        try:
            if len(ctx.connections) > ctx.settings.max_connections:
                raise LoginRefused(ReasonCode.SERVER_BUSY, "too many connections")
            self.principal = await authenticate(
                packet, ctx.registry, ctx.settings.allow_anonymous, self.client_certificate
            )
            client_id = packet.client_id
            if not client_id:
                if self.version == 4 and not packet.clean_start:
                    raise LoginRefused(
                        ReasonCode.CLIENT_IDENTIFIER_NOT_VALID,
                        "an empty client id needs a clean session",
                    )
                client_id = ctx.new_client_id()
        except LoginRefused as refused:
            ctx.stats.auth_failures += 1
            log.info("mqtt: CONNECT refused: %s", refused)
            reply = Properties(reason_string=str(refused)) if self.version == 5 else Properties()
            self.send(Connack(False, refused.reason, reply))
            self._flush()
            self.state = "closed"
            if self.transport is not None:
                self.transport.close()
            return
        if self._timer is not None:
            self._timer.cancel()
        if self.version == 5:
            self._holds = ~PAUSED_ACKS  # see the module docstring
            self.client_receive_max = props.receive_maximum or 65535
            self.client_max_packet = props.maximum_packet_size
            self.client_alias_max = props.topic_alias_maximum or 0
            expiry = props.session_expiry_interval or 0
        else:
            expiry = 0 if packet.clean_start else ctx.settings.max_session_expiry_s
        session, present = ctx.open_session(client_id, packet.clean_start, self)
        session.expiry_s = min(expiry, ctx.settings.max_session_expiry_s)
        session.will = packet.will
        session.device = self.principal.device
        self.session = session
        if not await ctx.session_ready(self, session):  # a persistent session is stored first
            return  # taken over or gone meanwhile, or refused
        self.reader.set_version(self.version)
        self.keep_alive = self._agree_keep_alive(packet.keep_alive)
        connack = Properties()
        if self.version == 5:
            s = ctx.settings
            connack = Properties(
                receive_maximum=s.receive_maximum,
                maximum_packet_size=s.max_packet_size,
                topic_alias_maximum=s.topic_alias_maximum,
                retain_available=1,
                wildcard_subscription_available=1,
                subscription_identifier_available=1,
                shared_subscription_available=1,
            )
            if not packet.client_id:
                connack.assigned_client_identifier = client_id
            if self.keep_alive != packet.keep_alive:
                connack.server_keep_alive = self.keep_alive
            if props.session_expiry_interval and session.expiry_s != expiry:
                connack.session_expiry_interval = session.expiry_s
        self.state = "connected"
        self.send(Connack(present, ReasonCode.SUCCESS, connack))
        self._flush()
        if self.keep_alive:
            self._timer = ctx.loop.call_later(self.keep_alive, self._check_keep_alive)
        ctx.device_api.on_connect(self)
        if present:
            for topic_filter in session.subscriptions:
                if ctx.device_api.handles(topic_filter):
                    ctx.device_api.on_subscribe(self, topic_filter)
            session.resend_inflight()
        # Packets that came after CONNECT wait in the reader: handle them now, in order.
        self._paused &= ~PAUSED_CONNECT
        self._receive()

    def _agree_keep_alive(self, requested: int) -> int:
        limit = self.ctx.settings.max_keep_alive_s
        if self.version == 5 and limit and (requested == 0 or requested > limit):
            return limit
        return requested

    def _check_keep_alive(self) -> None:
        if self.state != "connected" or not self.keep_alive:
            return
        idle = time.monotonic() - self.last_rx
        if idle > self.keep_alive * 1.5:
            log.info("mqtt %s: keep-alive timeout after %.0fs", self._who(), idle)
            self.close(ReasonCode.KEEP_ALIVE_TIMEOUT, "keep alive timeout")
            return
        wait = max(0.1, self.keep_alive * 1.5 - idle)
        self._timer = self.ctx.loop.call_later(wait, self._check_keep_alive)

    def _connect_timeout(self) -> None:
        if self.state in ("new", "connecting") and self.transport is not None:
            log.info("mqtt: no CONNECT within %ss; closing", CONNECT_TIMEOUT_S)
            self.transport.close()

    @property
    def unacked_in(self) -> int:
        """Incoming QoS 1/2 messages being handled (no PUBACK or PUBREC sent yet)."""
        return len(self._acks)

    @property
    def busy(self) -> bool:
        """Whether messages of this client are still being committed."""
        return bool(self._acks) or bool(self._tasks)

    def takeover(self) -> None:
        """Another connection took this client id over (MQTT 3.1.4-3)."""
        self._graceful = False
        self.close(ReasonCode.SESSION_TAKEN_OVER, "session taken over")

    def flush_later(self) -> None:
        """Write what async work queued (callbacks outside `data_received`)."""
        self._flush()
