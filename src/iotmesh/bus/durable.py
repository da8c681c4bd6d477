"""What the NATS JetStream and Redis Streams buses share: partition leases and settling.

A durable engine stores every message on one of `partitions` partitions (by key, with
`subjects.partition_of`, as the in-process bus). A consumer group keeps, per partition,
its own position in the engine (a JetStream durable consumer, a Redis consumer group).

Per-key order with several members in a group: each partition is consumed by ONE member
at a time, the holder of the partition's lease in the engine (a NATS KV entry, a Redis
key, both with a TTL of `ack_wait_s`, renewed every third of it). Members count each
other through heartbeats and each holds at most ceil(partitions / members) leases, so
a member that joins gets partitions from the others (they finish their current batch,
settle it and release) and the partitions of a member that dies are taken over once its
leases expire. The holder fetches one batch at a time and settles all of it before the
next fetch; a nacked message is redelivered before anything later of its partition
(JetStream: nak without delay puts it first; Redis: it stays in the holder's pending
list, which is read before new entries), and `nack(delay)` is honoured by the holder
waiting before its next fetch. So at most `max_batch` messages per partition are in
flight (bounded), and what a dead member held is redelivered, in order, to the next.

Dead letters: a message nacked (or left unsettled) on its `max_deliver`-th delivery, or
terminated, is published to `<dead_letter_subject>.<group>.<subject>` and then acked;
a message that arrives with more than `max_deliver` deliveries (its consumers died
holding it) goes there without reaching the handler. Doing this in the client rather
than with the engine's own limit means a given-up message always has a copy somewhere.

Error handling: an engine error while fetching or settling is logged and retried after
a pause; what was not acked is redelivered (at least once). A handler that raises gets
its unsettled deliveries nacked, as with the in-process bus. A member that cannot renew
a lease stops consuming that partition after its current batch.

Resource handling: one task per subscription (membership and leases) plus one per held
partition; `close` lets every partition finish and settle its batch, then releases the
leases so that the other members take over at once instead of after the TTL.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import math
import re
import uuid
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from iotmesh.bus import subjects
from iotmesh.bus.interface import BatchHandler, BusError, RecordedDelivery, Subscription
from iotmesh.core.settings import BusSettings

log = logging.getLogger(__name__)

_NAME = re.compile(r"[A-Za-z0-9_-]+")


def split_pattern(pattern: str) -> tuple[str, str]:
    """A subscription pattern as (subject space, rest); the space must be literal.

    Raises:
        BusError: the first token is a wildcard or not a plain name (a durable engine
            keeps one stream per subject space, so a pattern must name one).
    """
    space, _, rest = pattern.partition(".")
    if not _NAME.fullmatch(space):
        raise BusError(f"pattern {pattern!r}: the first token must name one subject space")
    return space, rest


def check_name(kind: str, name: str) -> str:
    """`name` if the engines accept it in stream, consumer and key names."""
    if not _NAME.fullmatch(name):
        raise BusError(f"{kind} {name!r}: use letters, digits, '-' and '_' only")
    return name


def group_id(group: str, pattern: str) -> str:
    """The engine name of a group: one group consuming two patterns is two positions."""
    return f"{check_name('group', group)}-{zlib.crc32(pattern.encode()):08x}"


@dataclass(eq=False)
class EngineMessage:
    """One message as fetched from the engine; `handle` is the engine's own object."""

    subject: str
    key: str
    data: bytes
    msg_id: str
    attempt: int
    handle: object = field(repr=False)


class Source(abc.ABC):
    """One partition of one group in the engine, read only by the lease holder."""

    @abc.abstractmethod
    async def take_over(self) -> None:
        """Called after the lease is won: what earlier holders left unsettled must be
        fetched before anything newer of the partition, however late their last
        keep-alive came."""

    @abc.abstractmethod
    async def fetch(self, max_batch: int, wait: float) -> list[EngineMessage]:
        """Up to `max_batch` messages, redeliveries first; [] after `wait` seconds."""

    @abc.abstractmethod
    async def ack(self, messages: Sequence[EngineMessage]) -> None:
        """Done with these; the engine may forget them (for this group)."""

    @abc.abstractmethod
    async def nak(self, messages: Sequence[EngineMessage]) -> None:
        """Redeliver these before anything later of this partition."""

    async def keep_alive(self, messages: Sequence[EngineMessage]) -> None:  # noqa: B027
        """The handler is still working on these: do not redeliver them yet."""

    async def close(self) -> None:  # noqa: B027
        """Release client-side resources (the engine keeps the position)."""


class Engine(abc.ABC):
    """What a `DurableGroup` needs from a bus implementation."""

    @abc.abstractmethod
    async def prepare_group(self, gid: str, pattern: str) -> None:
        """Make the group's positions exist in the engine for every partition."""

    @abc.abstractmethod
    async def open_source(self, gid: str, pattern: str, partition: int, member: str) -> Source:
        """A reader of one partition for the group, as `member` (the lease holder)."""

    @abc.abstractmethod
    async def dead_letter(self, group: str, message: EngineMessage, reason: str) -> None:
        """Store a copy of `message` under the dead-letter subject (durably)."""

    @abc.abstractmethod
    async def acquire(self, lease: str, member: str) -> bool:
        """Take the lease if nobody holds it."""

    @abc.abstractmethod
    async def renew(self, lease: str, member: str) -> bool:
        """Extend a lease `member` holds; False if it lost it."""

    @abc.abstractmethod
    async def release(self, lease: str, member: str) -> None:
        """Give a held lease up at once."""

    @abc.abstractmethod
    async def heartbeat(self, gid: str, member: str) -> int:
        """Say `member` is alive; return how many members of the group are."""

    @abc.abstractmethod
    async def leave(self, gid: str, member: str) -> None:
        """Say `member` is gone."""


class _DurableDelivery(RecordedDelivery):
    __slots__ = ("_state", "attempt", "data", "delay", "key", "message", "msg_id", "reason")

    def __init__(self, message: EngineMessage) -> None:
        self.message = message
        self.subject = message.subject
        self.key = message.key
        self.data = message.data
        self.msg_id = message.msg_id
        self.attempt = message.attempt
        self._state = "pending"
        self.delay = 0.0
        self.reason = ""


class DurableGroup(Subscription):
    """One member of a consumer group on a durable engine; see the module docstring."""

    def __init__(
        self,
        engine: Engine,
        pattern: str,
        group: str,
        handler: BatchHandler,
        settings: BusSettings,
        max_batch: int,
    ) -> None:
        self._engine = engine
        self._pattern = pattern
        self._group = group
        self._gid = group_id(group, pattern)
        self._handler = handler
        self._settings = settings
        self._max_batch = max_batch
        self.member = uuid.uuid4().hex[:12]
        self._tick = settings.ack_wait_s / 3
        self._closing = asyncio.Event()
        self._owned: dict[int, tuple[asyncio.Event, asyncio.Task[None]]] = {}
        # Loop time until which each held lease is surely ours (measured from before
        # the request that took or renewed it): a partition is not read past it.
        self._valid_until: dict[int, float] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._engine.prepare_group(self._gid, self._pattern)
        self._task = asyncio.create_task(self._membership(), name=f"bus.{self._group}.member")

    @property
    def partitions(self) -> list[int]:
        """The partitions this member holds now (for tests and stats)."""
        return sorted(self._owned)

    async def close(self) -> None:
        if self._task is None:
            return
        self._closing.set()
        task, self._task = self._task, None
        await task

    def _lease(self, partition: int) -> str:
        return f"{self._gid}.p{partition}"

    async def _membership(self) -> None:
        try:
            while not self._closing.is_set():
                try:
                    await self._rebalance()
                except Exception:
                    log.exception("bus group %s: lease round failed", self._group)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._tick):
                        await self._closing.wait()
        finally:
            await asyncio.gather(*(self._drop(p, release=True) for p in list(self._owned)))
            with contextlib.suppress(Exception):
                await self._engine.leave(self._gid, self.member)

    async def _rebalance(self) -> None:
        members = await self._engine.heartbeat(self._gid, self.member)
        loop = asyncio.get_running_loop()
        for p in list(self._owned):
            asked = loop.time()
            if self._owned[p][1].done() or not await self._engine.renew(
                self._lease(p), self.member
            ):
                await self._drop(p, release=False)
            else:
                self._valid_until[p] = asked + self._settings.ack_wait_s
        total = self._settings.partitions
        target = math.ceil(total / max(members, 1))
        surplus = sorted(self._owned, reverse=True)[: max(len(self._owned) - target, 0)]
        await asyncio.gather(*(self._drop(p, release=True) for p in surplus))
        start = zlib.crc32(self.member.encode()) % total  # members try different ones first
        for i in range(total):
            if len(self._owned) >= target or self._closing.is_set():
                break
            p = (start + i) % total
            asked = loop.time()
            if p not in self._owned and await self._engine.acquire(self._lease(p), self.member):
                self._valid_until[p] = asked + self._settings.ack_wait_s
                stop = asyncio.Event()
                task = asyncio.create_task(
                    self._consume(p, stop), name=f"bus.{self._group}.partition-{p}"
                )
                self._owned[p] = (stop, task)

    async def _drop(self, partition: int, *, release: bool) -> None:
        stop, task = self._owned.pop(partition)
        self._valid_until.pop(partition, None)
        stop.set()
        try:
            await task  # the batch in hand is settled first
        except Exception:
            log.exception("bus group %s, partition %d: consumer failed", self._group, partition)
        if release:
            with contextlib.suppress(Exception):
                await self._engine.release(self._lease(partition), self.member)

    async def _consume(self, partition: int, stop: asyncio.Event) -> None:
        source = await self._engine.open_source(self._gid, self._pattern, partition, self.member)
        try:
            await source.take_over()
            loop = asyncio.get_running_loop()
            while not stop.is_set():
                if loop.time() + self._tick > self._valid_until.get(partition, 0.0):
                    # Renewals failed (engine unreachable?): the lease may pass to
                    # another member, so stop reading before it can.
                    log.warning(
                        "bus group %s: lease on partition %d lapsing", self._group, partition
                    )
                    break
                try:
                    batch = await source.fetch(self._max_batch, min(1.0, self._tick))
                    delay = await self._process(source, batch) if batch else 0.0
                except Exception:
                    log.exception(
                        "bus group %s, partition %d: engine error", self._group, partition
                    )
                    delay = 1.0
                if delay > 0:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(delay):
                            await stop.wait()
        finally:
            with contextlib.suppress(Exception):
                await source.close()

    async def _dead_letter(self, message: EngineMessage, reason: str) -> None:
        await self._engine.dead_letter(self._group, message, reason)
        log.warning("bus group %s dead-lettered %s: %s", self._group, message.msg_id, reason)

    async def _process(self, source: Source, batch: list[EngineMessage]) -> float:
        """Hand one batch to the handler and settle it; return how long to wait."""
        limit = self._settings.max_deliver
        worn = [m for m in batch if m.attempt > limit]
        for message in worn:
            reason = f"delivered {message.attempt - 1} times, never settled"
            await self._dead_letter(message, reason)
        if worn:
            await source.ack(worn)
        deliveries = [_DurableDelivery(m) for m in batch if m.attempt <= limit]
        if not deliveries:
            return 0.0
        keeper = asyncio.create_task(self._keep_alive(source, deliveries), name="bus.keep-alive")
        try:
            await self._handler(deliveries)
        except Exception:
            log.exception(
                "bus group %s: handler failed; the batch will be redelivered", self._group
            )
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
        done: list[EngineMessage] = []
        retry: list[EngineMessage] = []
        delay = 0.0
        for d in deliveries:
            if d.state == "ack":
                done.append(d.message)
                continue
            if d.state == "term":
                reason = d.reason or f"terminated by group {self._group}"
            elif d.attempt >= limit:
                reason = f"group {self._group} failed it {d.attempt} times"
            else:
                retry.append(d.message)
                delay = max(delay, d.delay)
                continue
            await self._dead_letter(d.message, reason)
            done.append(d.message)
        if done:
            await source.ack(done)
        if retry:
            await source.nak(retry)
        return delay

    async def _keep_alive(self, source: Source, deliveries: Sequence[_DurableDelivery]) -> None:
        while True:
            await asyncio.sleep(self._tick)
            try:
                await source.keep_alive([d.message for d in deliveries if not d.settled])
            except Exception:
                log.warning("bus group %s: keep-alive failed", self._group, exc_info=True)


def dead_letter_subject(settings: BusSettings, group: str, subject: str) -> str:
    """Where a message of `subject` goes when `group` gives it up."""
    return f"{settings.dead_letter_subject}.{group}.{subject}"


def engine_subject(namespace: str, subject: str, partitions: int, key: str) -> str:
    """The engine subject of a message: `<ns>.<space>.p<n>[.<rest>]` (n by key)."""
    space, _, rest = subject.partition(".")
    check_name("subject space", space)
    name = f"{namespace}.{space}.p{subjects.partition_of(key, partitions)}"
    return f"{name}.{rest}" if rest else name


def bus_subject(namespace: str, engine: str) -> str:
    """Inverse of `engine_subject`."""
    tokens = engine.split(".")
    return ".".join([tokens[1], *tokens[3:]])
