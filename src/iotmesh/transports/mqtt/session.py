"""MQTT sessions: what the server remembers of a client, connected or not.

A session outlives its connection when the client asked for it (v3.1.1 Clean Session 0,
v5 Session Expiry Interval > 0): its subscriptions stay, and QoS 1/2 messages for it
are queued (at most `max_queued_messages`; beyond that the oldest QoS 0 message, or
else the new one, is dropped and counted, as Mosquitto does) until it returns.

Outgoing flow control: at most `min(max_inflight, client's Receive Maximum)` QoS 1/2
messages are unacknowledged at once; the rest wait in the queue. When the socket's
write buffer is full (`pause_writing`), delivery waits too: a slow subscriber cannot
make the server buffer without bound.

Delivery confirmation: `deliver(message, confirm)` resolves the future `confirm` once
the client has the message: for QoS 0 when it is written to the socket, for QoS 1 at
its PUBACK, for QoS 2 at its PUBREC. It fails with `DeviceGone` when the message is
dropped or the connection ends first (server-side RPC counts as DELIVERED only then).

Persistence: a session with a `keeper` (`persistence.SessionPersistence`) tells it what
must outlive a restart: every QoS 1/2 message queued while the client is offline (the
keeper returns the message's store `seq`), every stored message once it is acknowledged
or expired, and the whole session when its client leaves (`detach`).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from iotmesh.core.errors import DeviceGone, PayloadError
from iotmesh.core.types import Device
from iotmesh.proto.mqtt import Properties, Publish, Pubrel, Subscription, Will

if TYPE_CHECKING:
    from iotmesh.transports.mqtt.connection import MqttConnection


class SubscriptionEntry:
    """A granted subscription: its options and the v5 subscription identifier."""

    __slots__ = ("identifier", "options", "shared_group")

    def __init__(
        self, options: Subscription, identifier: int | None, shared_group: str | None
    ) -> None:
        self.options = options
        self.identifier = identifier
        self.shared_group = shared_group


class SessionKeeper(Protocol):
    """What a session reports so that it can outlive a restart (see `persistence.py`)."""

    def queued(self, session: Session, message: Publish) -> int:
        """A QoS 1/2 message was queued for the offline session: store it, return its seq."""

    def done(self, session: Session, seq: int) -> None:
        """The stored message `seq` was acknowledged (or expired): forget it."""

    def detached(self, session: Session) -> None:
        """The persistent session's client left: store the session and all it holds."""


# A held message: the message, when it was queued (monotonic, for v5 message expiry),
# and its seq in the session store (None: not stored).
Queued = tuple[Publish, float, int | None]
T = TypeVar("T")


class _NothingYet(collections.deque[Any]):
    """The queue every session and connection starts with, shared and always empty.

    An empty deque is 760 bytes; most clients never queue anything (an idle device, a
    QoS 0 publisher), and 10,000 of them spent ~15 MB on two empty deques each. A
    holder makes its own deque when it first adds to it (`own_queue`), so adding to this
    one is a bug, refused loudly rather than shared between clients.
    """

    def _refuse(self, *_: Any) -> None:
        raise TypeError("the shared empty queue holds nothing: use own_queue()")

    append = appendleft = extend = extendleft = insert = _refuse


NOTHING_YET: collections.deque[Any] = _NothingYet()


def own_queue(queue: collections.deque[T]) -> collections.deque[T]:
    """`queue`, or a new deque for a holder that still has the shared `NOTHING_YET`."""
    return collections.deque() if queue is NOTHING_YET else queue


class Session:
    """State of one client id."""

    __slots__ = (  # one per client id, so no per-instance __dict__
        "_confirm_inflight",
        "_confirm_queued",
        "_max_queued",
        "_next_id",
        "client_id",
        "connection",
        "device",
        "disconnected_at",
        "dropped",
        "expiry_s",
        "incoming_qos2",
        "inflight",
        "keeper",
        "queue",
        "stored",
        "stored_seqs",
        "subscriptions",
        "version",
        "will",
    )

    def __init__(
        self, client_id: str, max_queued: int, keeper: SessionKeeper | None = None
    ) -> None:
        self.client_id = client_id
        self.device: Device | None = None
        self.connection: MqttConnection | None = None
        self.subscriptions: dict[str, SubscriptionEntry] = {}
        self.expiry_s = 0  # how long the session outlives its connection
        self.disconnected_at: float | None = None
        self.will: Will | None = None
        self.version = 4  # protocol level of the client's latest CONNECT
        self.keeper = keeper  # None: nothing of this session is stored
        self.stored = False  # the session store holds this session
        self._max_queued = max_queued
        self.queue: collections.deque[Queued] = NOTHING_YET  # own_queue() before adding
        self.inflight: dict[int, Publish | Pubrel] = {}
        self.stored_seqs: dict[int, int] = {}  # packet id in flight -> seq in the store
        self.incoming_qos2: set[int] = set()  # PUBREC sent, waiting for PUBREL
        self._next_id = 1
        self.dropped = 0
        # Futures of `deliver(..., confirm)`: by id() of the queued message, then by the
        # packet id it went out with (until its PUBACK or PUBREC).
        self._confirm_queued: dict[int, asyncio.Future[None]] = {}
        self._confirm_inflight: dict[int, asyncio.Future[None]] = {}

    @property
    def persistent(self) -> bool:
        return self.expiry_s > 0

    def expired(self, now: float) -> bool:
        return (
            self.connection is None
            and self.disconnected_at is not None
            and now - self.disconnected_at >= self.expiry_s
        )

    def next_packet_id(self) -> int:
        """A packet id not in use by an unacknowledged outgoing message."""
        for _ in range(65535):
            packet_id = self._next_id
            self._next_id = packet_id % 65535 + 1
            if packet_id not in self.inflight:
                return packet_id
        raise RuntimeError("no free packet id")  # cannot happen: inflight ≤ 65535

    def deliver(self, message: Publish, confirm: asyncio.Future[None] | None = None) -> None:
        """Send now if the client is connected and has room, else queue (QoS > 0).

        `confirm`: resolved once the client has the message (see the module docstring).
        """
        conn = self.connection
        if conn is not None and not self.queue and conn.can_send(len(self.inflight)):
            self._sent(message, self._send(conn, message), confirm)
            return
        if conn is None and (message.qos == 0 or confirm is not None):
            # QoS 0 is not kept for offline clients (MQTT 3.1.2.4); a sender that wants
            # a confirmation keeps the message itself and sends it to the next session.
            _fail(confirm, DeviceGone("the client is offline"))
            return
        if confirm is not None:
            self._confirm_queued[id(message)] = confirm
        self._enqueue(message)

    def _sent(
        self, message: Publish, packet_id: int | None, confirm: asyncio.Future[None] | None
    ) -> None:
        """Follow the confirmation of a message that `_send` just handled."""
        if confirm is None:
            return
        if packet_id is not None:
            self._confirm_inflight[packet_id] = confirm
        elif message.qos == 0:
            _done(confirm)
        else:
            _fail(confirm, PayloadError("larger than the client's maximum packet size"))

    def _enqueue(self, message: Publish) -> None:
        if len(self.queue) >= self._max_queued:
            oldest_qos0 = next((item for item in self.queue if item[0].qos == 0), None)
            if oldest_qos0 is None:
                self.dropped += 1
                _fail(self._confirm_queued.pop(id(message), None), DeviceGone("queue full"))
                return
            self.queue.remove(oldest_qos0)
            _fail(self._confirm_queued.pop(id(oldest_qos0[0]), None), DeviceGone("queue full"))
            self.dropped += 1
        seq = None
        if self.connection is None and message.qos and self.keeper is not None and self.persistent:
            seq = self.keeper.queued(self, message)
        self.queue = own_queue(self.queue)
        self.queue.append((message, time.monotonic(), seq))

    def _send(self, conn: MqttConnection, message: Publish) -> int | None:
        """Send one message; return the packet id it got (None for QoS 0)."""
        packet_id = None
        if message.qos > 0:
            packet_id = self.next_packet_id()
            message = Publish(
                message.topic,
                message.payload,
                message.qos,
                message.retain,
                False,
                packet_id,
                message.properties,
            )
            self.inflight[packet_id] = message
        if not conn.send_publish(message):
            if packet_id is not None:  # discarded (too large): nothing to wait for
                del self.inflight[packet_id]
            return None
        return packet_id

    def pump(self) -> None:
        """Send queued messages while the client has room (after an ack, on resume)."""
        conn = self.connection
        while conn is not None and self.queue and conn.can_send(len(self.inflight)):
            message, queued_at, seq = self.queue.popleft()
            confirm = self._confirm_queued.pop(id(message), None)
            fresh = unexpired(message, time.monotonic() - queued_at)
            if fresh is None:
                self._forget(seq)
                _fail(confirm, DeviceGone("the message expired"))
                continue
            packet_id = self._send(conn, fresh)
            self._sent(fresh, packet_id, confirm)
            if seq is not None:
                if packet_id is None:
                    self._forget(seq)
                else:
                    self.stored_seqs[packet_id] = seq

    def acknowledged(self, packet_id: int) -> bool:
        """PUBACK or PUBCOMP arrived: the message is done."""
        if self.inflight.pop(packet_id, None) is None:
            return False
        _done(self._confirm_inflight.pop(packet_id, None))
        self._forget(self.stored_seqs.pop(packet_id, None))
        self.pump()
        return True

    def _forget(self, seq: int | None) -> None:
        if seq is not None and self.keeper is not None:
            self.keeper.done(self, seq)

    def received(self, packet_id: int) -> bool:
        """PUBREC arrived for a QoS 2 message: it becomes a PUBREL in flight."""
        if not isinstance(self.inflight.get(packet_id), Publish):
            return False
        self.inflight[packet_id] = Pubrel(packet_id)
        _done(self._confirm_inflight.pop(packet_id, None))
        return True

    def resend_inflight(self) -> None:
        """On a resumed session, send unacknowledged messages again (DUP set)."""
        conn = self.connection
        assert conn is not None
        for packet_id, item in list(self.inflight.items()):
            if isinstance(item, Publish):
                item.dup = True
                if not conn.send_publish(item):  # too large for this client: discarded
                    self.inflight.pop(packet_id, None)
                    self._forget(self.stored_seqs.pop(packet_id, None))
            else:
                conn.send(Pubrel(packet_id))
        self.pump()

    def detach(self) -> None:
        """The connection is gone: messages not confirmed yet will not be (here)."""
        confirms = [*self._confirm_queued.values(), *self._confirm_inflight.values()]
        self._confirm_queued.clear()
        self._confirm_inflight.clear()
        for confirm in confirms:
            _fail(confirm, DeviceGone("the connection ended before the client confirmed"))
        self.connection = None
        self.disconnected_at = time.monotonic()
        if self.keeper is not None and self.persistent:
            self.keeper.detached(self)

    def unstored(self, next_seq: Callable[[], int]) -> list[tuple[int, Publish | Pubrel, float]]:
        """Every QoS 1/2 message held here that the store lacks or knows only partly.

        That is every message in flight (the store must learn its packet id) and every
        queued one without a seq. Each gets a seq from `next_seq` if it has none.
        Returns (seq, message, queued at) in delivery order: in flight first.
        """
        now = time.monotonic()
        found: list[tuple[int, Publish | Pubrel, float]] = []
        for packet_id, item in self.inflight.items():
            seq = self.stored_seqs.get(packet_id)
            if seq is None:
                seq = self.stored_seqs[packet_id] = next_seq()
            found.append((seq, item, now))
        queue: collections.deque[Queued] = collections.deque()
        for message, queued_at, seq in self.queue:
            if seq is None and message.qos:
                seq = next_seq()
                found.append((seq, message, queued_at))
            queue.append((message, queued_at, seq))
        self.queue = queue
        return found


def _done(confirm: asyncio.Future[None] | None) -> None:
    if confirm is not None and not confirm.done():
        confirm.set_result(None)


def _fail(confirm: asyncio.Future[None] | None, exc: Exception) -> None:
    if confirm is not None and not confirm.done():
        confirm.set_exception(exc)


def unexpired(message: Publish, waited_s: float) -> Publish | None:
    """The message with its v5 Message Expiry Interval reduced by the time it waited,
    or None when it expired meanwhile (MQTT 3.3.2.3.3: it must not be sent)."""
    expiry = message.properties.message_expiry_interval
    if expiry is None or waited_s < 1:
        return message
    remaining = expiry - int(waited_s)
    if remaining <= 0:
        return None
    ids = list(message.properties.subscription_identifiers)
    fresh = copy_for(message, message.qos, message.retain, ids, source=message.properties)
    fresh.properties.message_expiry_interval = remaining
    return fresh


_FORWARDED = (
    "payload_format_indicator",
    "message_expiry_interval",
    "content_type",
    "response_topic",
    "correlation_data",
)


def copy_for(
    message: Publish,
    qos: int,
    retain: bool,
    identifiers: list[int],
    source: Properties | None = None,
) -> Publish:
    """The copy of a routed message one subscriber gets.

    Only the properties a receiver may see are forwarded (not the sender's topic alias;
    `source` lets a will's properties be used, without its Will Delay Interval).
    """
    props = message.properties if source is None else source
    if source is not None or identifiers or props.topic_alias is not None:
        fresh = Properties()
        for name in _FORWARDED:
            value = getattr(props, name)
            if value is not None:
                setattr(fresh, name, value)
        fresh.user_properties = list(props.user_properties)
        fresh.subscription_identifiers = identifiers
        props = fresh
    return Publish(message.topic, message.payload, qos, retain, False, None, props)
