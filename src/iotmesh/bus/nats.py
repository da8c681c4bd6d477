"""The bus on NATS JetStream (nats-py).

Layout in the engine, `ns` being `bus.namespace`:

- one stream `<ns>_<space>` per subject space (the first token of a subject, e.g.
  `telemetry`) holding the subjects `<ns>.<space>.>`. A message of subject
  `telemetry.dev-1` with key k is stored as `<ns>.telemetry.p<n>.dev-1`, n being
  `subjects.partition_of(k)`; the key travels in the `Iotmesh-Key` header and the
  message id in `Nats-Msg-Id`, which JetStream uses to drop duplicate publishes within
  `dedup_window_s`.
- Retention is by interest: a message is removed once every consumer whose filter
  matches it has acked it, so storage stays bounded by what is not yet consumed. With
  `discard: new` and `max_msgs = partitions * partition_queue` a full stream refuses
  a publish (never drops a stored message); `publish` retries until its timeout and
  then raises `Overloaded`. Caveat of interest retention: a message published while
  no group consumes its subject at all is not kept (subscribe groups first; their
  durable consumers outlive the processes).
- per group (and pattern) and partition, a durable pull consumer `<group>-<hash>_p<n>`
  filtering `<ns>.<space>.p<n>.<rest of the pattern>`, with explicit acks, `ack_wait`
  = `ack_wait_s`, `max_ack_pending` = the batch size (lowered by a new holder while
  it settles what the previous one left: `_NatsSource.take_over`), unlimited
  `max_deliver` (the client dead-letters, see durable.py, so nothing is given up
  without a copy).
- leases and member heartbeats in the KV bucket `<ns>_bus_leases` (TTL `ack_wait_s`).
- dead letters in the stream of the `dead_letter_subject` space, kept by age
  (`dead_letter_max_age_s`) rather than by interest.
- live broadcasts (`broadcast()`) on core subjects `<ns>.live.<topic>`, outside every
  stream (`nats_broadcast.py`).

`publish` returns when JetStream has stored the message (its PubAck).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Sequence
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.kv import KeyValue

from iotmesh.bus.durable import (
    DurableGroup,
    Engine,
    EngineMessage,
    Source,
    bus_subject,
    check_name,
    dead_letter_subject,
    engine_subject,
    split_pattern,
)
from iotmesh.bus.interface import BatchHandler, Bus, BusError, Subscription
from iotmesh.bus.nats_broadcast import NatsBroadcast
from iotmesh.core.errors import Overloaded
from iotmesh.core.settings import BusSettings
from iotmesh.engines.nats import KvLeases, open_bucket

KEY_HEADER = "Iotmesh-Key"
MSG_ID_HEADER = "Iotmesh-Msg-Id"  # set on dead letters, whose Nats-Msg-Id names the group
REASON_HEADER = "Iotmesh-Reason"
_FULL = {10077, 10047}  # JetStream: maximum messages / bytes exceeded


class _NatsSource(Source):
    def __init__(
        self,
        bus: NatsBus,
        sub: JetStreamContext.PullSubscription,
        stream: str,
        config: ConsumerConfig,
    ) -> None:
        self._bus = bus
        self._sub = sub
        self._stream = stream
        self._config = config
        # Messages an earlier holder left unsettled that this one has yet to settle;
        # while there are any, the consumer delivers nothing new (see take_over).
        self._inherited = 0

    async def take_over(self) -> None:
        """Keep new messages back until what an earlier holder left unsettled is settled.

        JetStream redelivers a message only when its ack wait runs out, counted from the
        dead holder's last keep-alive, and until then it would hand newer messages of
        the partition to the successor: a device's later message could be stored before
        an earlier one. So the successor lowers the consumer's `max_ack_pending` to the
        number of messages still pending. The server can then deliver nothing new until
        those come back (redeliveries do not count against the limit) and are settled,
        and the limit is put back as they are. The wait is the server's own redelivery,
        not a margin guessed for its timer, which a loaded host can make late.
        """
        await self._hold_back(await self._pending())

    async def _pending(self) -> int:
        """How many messages the consumer has out, unacked (by anyone)."""
        return (await self._sub.consumer_info()).num_ack_pending or 0

    async def _hold_back(self, inherited: int) -> None:
        """Let the consumer have only `inherited` messages out (0: its usual limit)."""
        self._inherited = inherited
        limit = inherited or self._config.max_ack_pending
        await self._bus.update_consumer(
            self._stream, dataclasses.replace(self._config, max_ack_pending=limit)
        )

    async def fetch(self, max_batch: int, wait: float) -> list[EngineMessage]:
        try:
            msgs = await self._sub.fetch(max_batch, timeout=wait)
        except TimeoutError:  # nats-py raises its own and asyncio's: nothing came
            msgs = []
        if not msgs and self._inherited:
            # Still waiting for redeliveries; a holder that was cut off rather than
            # dead may have settled some itself meanwhile.
            pending = await self._pending()
            if pending < self._inherited:
                await self._hold_back(pending)
        return [self._bus.to_message(m) for m in msgs]

    async def ack(self, messages: Sequence[EngineMessage]) -> None:
        left = max(self._inherited - len(messages), 0)
        if left:  # lowered first, so that no new message slips in once these are acked
            await self._hold_back(left)
        for m in messages:
            await _msg(m).ack()
        # Acks are fire-and-forget; a flush makes the server have them before this
        # member releases a lease and another starts reading the partition.
        await self._bus.flush()
        if self._inherited and not left:
            await self._hold_back(0)

    async def nak(self, messages: Sequence[EngineMessage]) -> None:
        for m in messages:
            await _msg(m).nak()  # no delay: first in line; the holder waits the delay
        await self._bus.flush()

    async def keep_alive(self, messages: Sequence[EngineMessage]) -> None:
        for m in messages:
            await _msg(m).in_progress()

    async def close(self) -> None:
        await self._sub.unsubscribe()


def _msg(message: EngineMessage) -> Msg:
    handle = message.handle
    assert isinstance(handle, Msg)
    return handle


class NatsBus(Bus, Engine):
    """Bus on NATS JetStream; see the module docstring."""

    def __init__(self, settings: BusSettings) -> None:
        self.settings = settings
        self._ns = check_name("namespace", settings.namespace)
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._kv: KeyValue | None = None
        self._streams: set[str] = set()
        self._groups: list[DurableGroup] = []
        self._broadcast: NatsBroadcast | None = None

    @property
    def client(self) -> Client:
        if self._nc is None:
            raise BusError("the bus is stopped")
        return self._nc

    async def flush(self) -> None:
        """Wait until the server has everything sent so far (acks are fire-and-forget)."""
        await self.client.flush(max(1, round(self.settings.request_timeout_s)))

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            raise BusError("the bus is stopped")
        return self._js

    async def start(self) -> None:
        timeout = self.settings.request_timeout_s
        try:
            self._nc = await nats.connect(
                self.settings.nats_url,
                connect_timeout=timeout,
                allow_reconnect=True,
                reconnected_cb=self._reconnected,
            )
        except (OSError, nats.errors.Error) as exc:
            raise BusError(f"cannot connect to NATS at {self.settings.nats_url}: {exc}") from exc
        self._js = self._nc.jetstream(timeout=timeout)
        try:
            # Made earlier by a process with another ack wait: used as it is.
            self._kv = await open_bucket(
                self._js, f"{self._ns}_bus_leases", self.settings.ack_wait_s
            )
        except nats.js.errors.BadRequestError as exc:
            raise BusError(f"cannot create the lease bucket: {exc.description}") from exc
        self._leases = KvLeases(self._kv)

    async def _reconnected(self) -> None:
        if self._broadcast is not None:
            await self._broadcast.reconnected()

    def broadcast(self) -> NatsBroadcast:
        """Live fan-out on this connection (`broadcast.py`), made on first use."""
        if self._broadcast is None:
            self._broadcast = NatsBroadcast(self.client, self._ns)
        return self._broadcast

    async def stop(self) -> None:
        groups, self._groups = self._groups, []
        for group in groups:
            await group.close()
        nc, self._nc, self._js, self._kv = self._nc, None, None, None
        self._broadcast = None
        self._streams.clear()
        if nc is not None:
            await nc.drain()

    # -- streams ------------------------------------------------------------------

    def stream_name(self, space: str) -> str:
        return f"{self._ns}_{space}"

    async def _ensure_stream(self, space: str) -> str:
        name = self.stream_name(space)
        if name in self._streams:
            return name
        config = StreamConfig(
            name=name,
            subjects=[f"{self._ns}.{space}.>"],
            storage=StorageType.FILE,
            duplicate_window=self.settings.dedup_window_s,
            discard=DiscardPolicy.NEW,
        )
        if space == self.settings.dead_letter_subject:
            config.retention = RetentionPolicy.LIMITS
            config.max_age = self.settings.dead_letter_max_age_s
        else:
            config.retention = RetentionPolicy.INTEREST
            config.max_msgs = self.settings.partitions * self.settings.partition_queue
        try:
            await self.js.add_stream(config)
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code != 10058:  # "stream name already in use": made elsewhere
                raise BusError(f"cannot create stream {name}: {exc.description}") from exc
        self._streams.add(name)
        return name

    # -- publishing ---------------------------------------------------------------

    async def publish(
        self, subject: str, data: bytes, *, key: str, msg_id: str, timeout: float | None = None
    ) -> None:
        await self._publish(subject, data, {KEY_HEADER: key, "Nats-Msg-Id": msg_id}, timeout)

    async def _publish(
        self, subject: str, data: bytes, headers: dict[str, str], timeout: float | None
    ) -> None:
        space = subject.partition(".")[0]
        await self._ensure_stream(space)
        target = engine_subject(self._ns, subject, self.settings.partitions, headers[KEY_HEADER])
        pause = 0.005
        try:
            async with asyncio.timeout(timeout):
                while True:
                    try:
                        await self.js.publish(target, data, headers=headers)
                        return
                    except nats.js.errors.APIError as exc:
                        if exc.err_code not in _FULL:
                            raise BusError(f"JetStream refused {subject}: {exc}") from exc
                    await asyncio.sleep(pause)  # full: wait for consumers to make room
                    pause = min(pause * 2, 0.5)
        except TimeoutError:
            raise Overloaded("the bus is full; retry later") from None
        except nats.errors.TimeoutError as exc:
            raise BusError(f"JetStream did not confirm {subject}") from exc
        except nats.errors.Error as exc:
            raise BusError(f"cannot publish {subject}: {exc}") from exc

    # -- consuming ----------------------------------------------------------------

    async def subscribe(
        self, pattern: str, group: str, handler: BatchHandler, *, max_batch: int | None = None
    ) -> Subscription:
        sub = DurableGroup(
            self, pattern, group, handler, self.settings, max_batch or self.settings.max_batch
        )
        await sub.start()
        self._groups.append(sub)
        return sub

    def _consumer(self, gid: str, pattern: str, partition: int) -> tuple[str, ConsumerConfig]:
        space, rest = split_pattern(pattern)
        filter_subject = f"{self._ns}.{space}.p{partition}"
        config = ConsumerConfig(
            durable_name=f"{gid}_p{partition}",
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.settings.ack_wait_s,
            max_deliver=-1,
            max_ack_pending=self.settings.max_batch,
            filter_subject=f"{filter_subject}.{rest}" if rest else filter_subject,
        )
        return self.stream_name(space), config

    async def prepare_group(self, gid: str, pattern: str) -> None:
        """Create the group's consumers that do not exist yet.

        An existing one is left as it is: its holder may be keeping new messages back
        (`_NatsSource.take_over`), and each new holder applies this member's settings
        to it anyway.
        """
        stream = await self._ensure_stream(split_pattern(pattern)[0])
        for p in range(self.settings.partitions):
            _, config = self._consumer(gid, pattern, p)
            assert config.durable_name is not None
            try:
                await self.js.consumer_info(stream, config.durable_name)
            except nats.js.errors.NotFoundError:
                pass
            else:
                continue  # exists: left as it is
            try:
                await self.js.add_consumer(stream, config)
            except nats.js.errors.BadRequestError as exc:
                if exc.err_code != 10013:  # "consumer name already in use": made elsewhere
                    raise BusError(f"cannot create consumer: {exc.description}") from exc

    async def update_consumer(self, stream: str, config: ConsumerConfig) -> None:
        """Apply `config` to an existing durable consumer (the create request updates)."""
        try:
            await self.js.add_consumer(stream, config)
        except nats.js.errors.BadRequestError as exc:
            raise BusError(f"cannot update consumer: {exc.description}") from exc

    async def open_source(self, gid: str, pattern: str, partition: int, member: str) -> Source:
        stream, config = self._consumer(gid, pattern, partition)
        assert config.durable_name is not None
        sub = await self.js.pull_subscribe_bind(durable=config.durable_name, stream=stream)
        return _NatsSource(self, sub, stream, config)

    def to_message(self, msg: Msg) -> EngineMessage:
        headers = msg.headers or {}
        return EngineMessage(
            subject=bus_subject(self._ns, msg.subject),
            key=headers.get(KEY_HEADER, ""),
            data=msg.data,
            msg_id=headers.get(MSG_ID_HEADER) or headers.get("Nats-Msg-Id", ""),
            attempt=msg.metadata.num_delivered,
            handle=msg,
        )

    async def dead_letter(self, group: str, message: EngineMessage, reason: str) -> None:
        headers = {
            KEY_HEADER: message.key,
            MSG_ID_HEADER: message.msg_id,
            "Nats-Msg-Id": f"{group}/{message.msg_id}",
            REASON_HEADER: reason.replace("\r", " ").replace("\n", " "),
        }
        subject = dead_letter_subject(self.settings, group, message.subject)
        await self._publish(subject, message.data, headers, self.settings.request_timeout_s)

    # -- leases -------------------------------------------------------------------

    @property
    def kv(self) -> KeyValue:
        if self._kv is None:
            raise BusError("the bus is stopped")
        return self._kv

    async def acquire(self, lease: str, member: str) -> bool:
        return await self._leases.acquire(f"lease.{lease}", member.encode()) is not None

    async def renew(self, lease: str, member: str) -> bool:
        return await self._leases.renew(f"lease.{lease}", member.encode()) is not None

    async def release(self, lease: str, member: str) -> None:
        await self._leases.release(f"lease.{lease}", member.encode())

    async def heartbeat(self, gid: str, member: str) -> int:
        await self.kv.put(f"member.{gid}.{member}", b"1")
        try:
            keys = await self.kv.keys()
        except nats.js.errors.NoKeysError:
            return 1
        prefix = f"member.{gid}."
        return max(1, sum(1 for k in keys if k.startswith(prefix)))

    async def leave(self, gid: str, member: str) -> None:
        await self.kv.delete(f"member.{gid}.{member}")

    # -- for tests and operators ----------------------------------------------------

    async def delete_everything(self) -> None:
        """Delete every stream, the lease bucket and the RPC claims bucket
        (`nats_rpc.py`) of this namespace (tests)."""
        names: list[str] = []
        buckets = {f"KV_{self._ns}_bus_leases", f"KV_{self._ns}_rpc_claims"}
        info: Any
        for info in await self.js.streams_info():
            name = info.config.name
            if name and (name.startswith(f"{self._ns}_") or name in buckets):
                names.append(name)
        for name in names:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await self.js.delete_stream(name)
