"""Persistent MQTT sessions and retained messages across restarts: what goes to the
session store, and when.

A persistent session (v3.1.1 Clean Session 0, v5 Session Expiry Interval > 0) is
written to a `SessionStore`; a clean one never is. Every retained message is, and so
is every clear of one. Every write goes through one `SessionJournal`: changes are
appended in order and written by one task, everything that piled up during a write in
the next one (group commit), so a burst of offline messages costs one transaction, not
one each.

What waits for the store (acknowledged means durable, as everywhere in iotmesh):

    CONNACK             of a persistent session: after the session is stored; of a
                        clean start that replaced a stored session: after it is deleted.
    SUBACK / UNSUBACK   of a persistent session: after its new subscriptions are stored.
    PUBACK / PUBREC     to a publisher whose message was queued for an offline
                        persistent session: after those queued copies are stored; of a
                        retained message: after it is stored (an empty one: after the
                        stored one is deleted).

What is written without anyone waiting: retained QoS 0 messages and retained wills (in
the next write, at once when none is in progress); when a persistent session's client
leaves, the session (with its disconnect time) and every QoS 1/2 message held for it,
those in flight with their packet ids; acknowledged or expired stored messages are
removed; expired sessions and retained messages are deleted. On a clean stop every
client has left, so all of it is written before the store closes.

Retained messages are loaded before clients are accepted; one whose v5 Message Expiry
Interval passed (counting from the stored time, so downtime counts) is deleted instead.

Not stored: QoS 0 messages other than retained ones, wills (and Will Delay timers), the
ids of incoming QoS 2 messages awaiting PUBREL, and the packet ids of messages sent to
a connected client (a message that came from the stored queue keeps its stored copy
until acknowledged). So after a kill -9, a message that was in flight to a connected
client is lost unless it had been queued while the client was offline, and a stored
message that was sent but not yet acknowledged is sent again as a new message (at
least once; for QoS 2 a duplicate is possible). See docs/device-api.md.

Error handling: a failed write is logged; whoever waited for it is refused (CONNACK
"server unavailable", the connection of a SUBSCRIBE closed, a v5 PUBACK 0x80 or a
v3.1.1 publisher's connection closed), so its client tries again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import msgspec

from iotmesh.core.clock import now_ms
from iotmesh.core.errors import NotFound
from iotmesh.proto.mqtt import Properties, Publish, Pubrel, Subscription
from iotmesh.registry.service import DeviceRegistry
from iotmesh.storage.sessions import (
    DeleteSession,
    QueuePut,
    QueueRemove,
    RetainDelete,
    RetainPut,
    SaveSession,
    SessionRecord,
    SessionStore,
    SessionWrite,
    StoredMessage,
    StoredRetained,
    StoredSession,
    StoredSubscription,
)
from iotmesh.transports.mqtt.broker import Broker
from iotmesh.transports.mqtt.session import Session, SubscriptionEntry, own_queue, unexpired

log = logging.getLogger(__name__)

Waiter = Callable[[bool], None]
"""Called with True once the writes it waited for are durable, False if they failed."""


class SessionJournal:
    """Writes session changes to a store in order, batching what piles up.

    Resource handling: `start` starts the writer task; `close` writes what is pending,
    then ends it. Memory: the pending changes are bounded by what waits for them (a
    publisher gets no ack, so it stops sending at its receive maximum), and pending
    retained changes, which nobody waits for at QoS 0, by their number of topics.
    """

    def __init__(self, store: SessionStore) -> None:
        self._store = store
        self._ops: list[SessionWrite] = []
        self._waiters: list[Waiter] = []
        self._writing: list[Waiter] | None = None  # waiters of the write in progress
        self._retain_at: dict[str, int] = {}  # topic -> index in _ops of its retained change
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.added = 0  # changes added so far (a caller compares it to see if it added any)
        self.writes = 0
        self.failures = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name="mqtt.session-journal"
        )

    def add(self, op: SessionWrite) -> None:
        """Append a change; it is written soon, after every change added before it."""
        if self._closed:
            log.warning(
                "mqtt session store already closed; %s of %s not written",
                type(op).__name__,
                _subject(op),
            )
            return
        self.added += 1
        if isinstance(op, RetainPut | RetainDelete):
            # Only the last retained change of a topic matters, and nothing else touches
            # retained messages: a newer one takes the place of a pending one. So what a
            # QoS 0 retained flood leaves pending is bounded by its number of topics.
            topic = _subject(op)
            at = self._retain_at.get(topic)
            if at is not None:
                self._ops[at] = op
                return
            self._retain_at[topic] = len(self._ops)
            self._ops.append(op)
            self._wake.set()
            return
        last = self._ops[-1] if self._ops else None
        # Consecutive queue changes of one client become one operation.
        if (
            isinstance(op, QueueRemove)
            and isinstance(last, QueueRemove)
            and last.client_id == op.client_id
        ):
            last.seqs.extend(op.seqs)
            return
        if (
            isinstance(op, QueuePut)
            and isinstance(last, QueuePut)
            and last.client_id == op.client_id
        ):
            last.messages.extend(op.messages)
            return
        self._ops.append(op)
        self._wake.set()

    def after_write(self, waiter: Waiter) -> None:
        """Call `waiter` once every change added so far is written (at once if all are)."""
        if self._ops:
            self._waiters.append(waiter)
        elif self._writing is not None:
            self._writing.append(waiter)
        else:
            waiter(True)

    async def flushed(self) -> bool:
        """Wait until every change added so far is written; False if that failed."""
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.after_write(lambda ok: None if done.done() else done.set_result(ok))
        return await done

    async def close(self) -> None:
        """Write everything pending, then stop."""
        self._closed = True
        self._wake.set()
        if self._task is not None:
            await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            if not self._ops:
                if self._closed:
                    return
                await self._wake.wait()
                self._wake.clear()
                continue
            ops, self._ops = self._ops, []
            self._retain_at.clear()
            waiters, self._waiters = self._waiters, []
            self._writing = waiters
            ok = True
            try:
                await self._store.write(ops)
                self.writes += 1
            except Exception:  # a storage failure must not stop later writes
                ok = False
                self.failures += 1
                log.exception("writing %d MQTT session changes failed", len(ops))
            finally:
                self._writing = None
            for waiter in waiters:
                try:
                    waiter(ok)
                except Exception:
                    log.exception("a session store waiter failed")


def _subject(op: SessionWrite) -> str:
    """The client id or topic a change is about (for logs and merging)."""
    if isinstance(op, SaveSession):
        return op.session.client_id
    if isinstance(op, RetainPut):
        return op.message.topic
    if isinstance(op, RetainDelete):
        return op.topic
    return op.client_id


class SessionPersistence:
    """Keeps persistent sessions and retained messages in a `SessionStore` (the
    `SessionKeeper` of sessions and the `RetainKeeper` of the broker).

    Args:
        store: where sessions go; opened and closed by the caller.
        max_queued: `mqtt.max_queued_messages`, applied again when sessions are loaded.
        offline: called when a persistent session's client leaves (the server uses it
            to keep pushing shared attributes into the session's queue).
    """

    def __init__(
        self, store: SessionStore, max_queued: int, offline: Callable[[Session], None]
    ) -> None:
        self.journal = SessionJournal(store)
        self._store = store
        self._max_queued = max_queued
        self._offline = offline
        self._seq = 0

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    # -- SessionKeeper --------------------------------------------------------------------

    def queued(self, session: Session, message: Publish) -> int:
        seq = self.next_seq()
        stored = _stored_message(seq, message, now_ms())
        self.journal.add(QueuePut(session.client_id, [stored]))
        return seq

    def done(self, session: Session, seq: int) -> None:
        self.journal.add(QueueRemove(session.client_id, [seq]))

    def detached(self, session: Session) -> None:
        held = session.unstored(self.next_seq)
        self.save(session)
        if held:
            mono, wall = time.monotonic(), now_ms()
            messages = [
                _stored_message(seq, item, wall - int((mono - queued_at) * 1000))
                for seq, item, queued_at in held
            ]
            self.journal.add(QueuePut(session.client_id, messages))
        self._offline(session)

    # -- RetainKeeper ---------------------------------------------------------------------

    def retained(self, message: Publish) -> None:
        properties = _encode_properties(message.properties)
        stored = StoredRetained(message.topic, message.payload, message.qos, properties, now_ms())
        self.journal.add(RetainPut(stored))

    def retain_cleared(self, topic: str) -> None:
        self.journal.add(RetainDelete(topic))

    # -- the server's side ----------------------------------------------------------------

    def save(self, session: Session) -> None:
        """Store the session and its subscriptions (its messages are written apart)."""
        self.journal.add(SaveSession(_stored_session(session)))
        session.stored = True

    def forget(self, session: Session) -> None:
        """Delete a stored session with everything it holds."""
        if session.stored:
            self.journal.add(DeleteSession(session.client_id))
            session.stored = False

    async def restore(self, registry: DeviceRegistry) -> list[Session]:
        """Load the stored sessions that have not expired, as offline sessions.

        Expired ones (counting from the stored disconnect time; a session that was
        connected when the server died counts from now) and those of deleted devices
        are deleted. Subscriptions are restored on the sessions only: the caller puts
        them into the broker.
        """
        records = await self._store.load_all()
        restored: list[Session] = []
        expired = 0
        for record in records:
            if record.messages:
                self._seq = max(self._seq, record.messages[-1].seq)
            session = await self._restore_one(record, registry)
            if session is None:
                expired += 1
                self.journal.add(DeleteSession(record.session.client_id))
            else:
                restored.append(session)
        if records:
            log.info(
                "restored %d persistent MQTT sessions (%d messages held); %d expired",
                len(restored),
                sum(len(s.queue) + len(s.inflight) for s in restored),
                expired,
            )
        return restored

    async def restore_retained(self, broker: Broker) -> None:
        """Load the stored retained messages into `broker`; delete the expired ones.

        A v5 Message Expiry Interval counts from the stored time, so the time the
        server was down counts.
        """
        wall, mono = now_ms(), time.monotonic()
        loaded = expired = 0
        for stored in await self._store.load_retained():
            props = _decode_properties(stored.properties)
            message = Publish(stored.topic, stored.payload, stored.qos, True, False, None, props)
            held_s = max(0, wall - stored.stored_ms) / 1000
            if unexpired(message, held_s) is None:
                expired += 1
                self.journal.add(RetainDelete(stored.topic))
                continue
            broker.load(message, mono - held_s)
            loaded += 1
        if loaded or expired:
            log.info("restored %d retained MQTT messages; %d expired", loaded, expired)

    async def _restore_one(self, record: SessionRecord, registry: DeviceRegistry) -> Session | None:
        stored = record.session
        wall, mono = now_ms(), time.monotonic()
        gone_ms = 0 if stored.disconnected_ms is None else max(0, wall - stored.disconnected_ms)
        if stored.expiry_s <= 0 or gone_ms >= stored.expiry_s * 1000:
            return None
        session = Session(stored.client_id, self._max_queued, self)
        if stored.device_id is not None:
            try:
                session.device = await registry.get(stored.device_id)
            except NotFound:
                return None  # the device was deleted meanwhile
        session.expiry_s = stored.expiry_s
        session.version = stored.protocol_version
        session.disconnected_at = mono - gone_ms / 1000
        session.stored = True
        for sub in stored.subscriptions:
            options = Subscription(
                sub.topic_filter,
                sub.qos,
                sub.no_local,
                sub.retain_as_published,
                sub.retain_handling,
            )
            session.subscriptions[sub.topic_filter] = SubscriptionEntry(
                options, sub.identifier, sub.shared_group
            )
        dropped: list[int] = []
        for m in record.messages:
            if m.packet_id is not None and m.packet_id not in session.inflight:
                session.inflight[m.packet_id] = (
                    Pubrel(m.packet_id) if m.released else _publish(m, m.packet_id)
                )
                session.stored_seqs[m.packet_id] = m.seq
            elif len(session.queue) < self._max_queued and not m.released:
                queued_at = mono - max(0, wall - m.queued_ms) / 1000
                session.queue = own_queue(session.queue)
                session.queue.append((_publish(m, None), queued_at, m.seq))
            else:  # over a limit lowered since it was stored: the newest go, as in memory
                dropped.append(m.seq)
                session.dropped += 1
        if dropped:
            self.journal.add(QueueRemove(stored.client_id, dropped))
        if stored.disconnected_ms is None:
            self.save(session)  # it was connected when the server died: it left now
        return session


def _wall_ms(monotonic_at: float) -> int:
    return now_ms() - int((time.monotonic() - monotonic_at) * 1000)


def _stored_session(session: Session) -> StoredSession:
    subscriptions = [
        StoredSubscription(
            topic_filter,
            entry.options.qos,
            entry.options.no_local,
            entry.options.retain_as_published,
            entry.options.retain_handling,
            entry.identifier,
            entry.shared_group,
        )
        for topic_filter, entry in session.subscriptions.items()
    ]
    disconnected = None
    if session.connection is None and session.disconnected_at is not None:
        disconnected = _wall_ms(session.disconnected_at)
    return StoredSession(
        session.client_id,
        None if session.device is None else session.device.id,
        session.version,
        session.expiry_s,
        disconnected,
        subscriptions,
    )


def _stored_message(seq: int, item: Publish | Pubrel, queued_ms: int) -> StoredMessage:
    if isinstance(item, Pubrel):
        return StoredMessage(
            seq, "", b"", 2, queued_ms=queued_ms, packet_id=item.packet_id, released=True
        )
    return StoredMessage(
        seq,
        item.topic,
        item.payload,
        item.qos,
        item.retain,
        _encode_properties(item.properties),
        queued_ms,
        item.packet_id,
    )


def _publish(m: StoredMessage, packet_id: int | None) -> Publish:
    props = _decode_properties(m.properties)
    return Publish(m.topic, m.payload, m.qos, m.retain, packet_id is not None, packet_id, props)


# The properties a routed copy may carry (see `session.copy_for`), stored by name.
_SCALARS = (
    "payload_format_indicator",
    "message_expiry_interval",
    "content_type",
    "response_topic",
    "correlation_data",
)
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(dict[str, Any])


def _encode_properties(props: Properties) -> bytes | None:
    doc: dict[str, Any] = {}
    for name in _SCALARS:
        value = getattr(props, name)
        if value is not None:
            doc[name] = value
    if props.user_properties:
        doc["user_properties"] = [list(pair) for pair in props.user_properties]
    if props.subscription_identifiers:
        doc["subscription_identifiers"] = list(props.subscription_identifiers)
    return _encoder.encode(doc) if doc else None


def _decode_properties(data: bytes | None) -> Properties:
    props = Properties()
    if not data:
        return props
    doc = _decoder.decode(data)
    for name in _SCALARS:
        if name in doc:
            setattr(props, name, doc[name])
    props.user_properties = [(k, v) for k, v in doc.get("user_properties", [])]
    props.subscription_identifiers = list(doc.get("subscription_identifiers", []))
    return props
