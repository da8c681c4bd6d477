"""The in-process bus of `iotmesh run`: bounded queues, partitions, consumer groups.

It stores nothing, so a publish completes only when every group has acknowledged the
message: for the device, "published" then already means "committed" (see interface.py).

Per group and partition there is one bounded FIFO and one consumer task, which hands
the handler batches of up to `max_batch` messages in order. A nacked message is retried
before anything not yet delivered from its partition (a handler that nacks a message
should nack the later ones of the same key in its batch too, as the pipeline does);
after `max_deliver` attempts (or a `term`) its publisher gets `DeadLettered`.

Routing: the partitions of a (subject, key) pair are looked up once and cached (every
device has a subject of its own, so matching each publish against every group's pattern
and hashing its key was ~10% of the event loop at 15k MQTT messages/s); the cache is
dropped whenever a group comes or goes, and bounded (`_MAX_ROUTES`).

Resource handling: queues are bounded (`partition_queue`), so publishers wait for room
(back-pressure) and memory stays bounded. `stop` drains: consumers finish every message
already queued before their tasks end.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable, Sequence

from iotmesh.bus import subjects
from iotmesh.bus.interface import (
    BatchHandler,
    Bus,
    BusError,
    DeadLettered,
    RecordedDelivery,
    Subscription,
)
from iotmesh.core.errors import Overloaded
from iotmesh.core.settings import BusSettings

log = logging.getLogger(__name__)

_MAX_ROUTES = 65_536  # cached (subject, key) routes; all dropped when it is full


class _Message:
    """A published message and the publisher waiting for every group to settle it:
    through a future (`publish`) or a callback (`publish_nowait`)."""

    __slots__ = ("data", "done", "key", "msg_id", "on_done", "subject", "unsettled_groups")

    def __init__(
        self,
        subject: str,
        key: str,
        data: bytes,
        msg_id: str,
        groups: int,
        on_done: Callable[[BaseException | None], None] | None = None,
    ) -> None:
        self.subject = subject
        self.key = key
        self.data = data
        self.msg_id = msg_id
        self.unsettled_groups = groups
        self.on_done = on_done
        self.done = False

    def group_done(self) -> None:
        self.unsettled_groups -= 1
        if self.unsettled_groups == 0:
            self._finish(None)

    def give_up(self, reason: str) -> None:
        self._finish(DeadLettered(f"message {self.msg_id}: {reason}"))

    def _finish(self, error: BaseException | None) -> None:
        if self.done:
            return
        self.done = True
        if self.on_done is not None:
            try:
                self.on_done(error)  # at once: no loop turn between commit and device ack
            except Exception:  # the publisher's bug must not break the consumer's settling
                log.exception("bus: a publisher's completion callback failed")


class _MemoryDelivery(RecordedDelivery):
    __slots__ = ("_state", "attempt", "data", "delay", "key", "message", "msg_id", "reason")

    def __init__(self, message: _Message, attempt: int) -> None:
        self.message = message
        self.subject = message.subject
        self.key = message.key
        self.data = message.data
        self.msg_id = message.msg_id
        self.attempt = attempt
        self._state = "pending"
        self.delay = 0.0
        self.reason = ""


class _Partition:
    """A bounded FIFO of messages with one consumer.

    Unlike `asyncio.Queue` it lets a publisher wait for room in several partitions and
    then enqueue into all of them at once, so a publish that times out has reached no
    group at all (never some of them).
    """

    def __init__(self, maxsize: int) -> None:
        self._items: collections.deque[_Message] = collections.deque()
        self._maxsize = maxsize
        self._not_empty = asyncio.Event()
        self.room = asyncio.Event()
        self.room.set()
        self.closed = False
        self.waiters = 0  # publishers waiting for room: a closing partition drains them too

    def __len__(self) -> int:
        return len(self._items)

    def has_room(self) -> bool:
        return len(self._items) < self._maxsize

    def put_nowait(self, message: _Message) -> None:
        self._items.append(message)
        self._not_empty.set()
        if not self.has_room():
            self.room.clear()

    def close(self) -> None:
        """No more messages will come; the consumer drains what is left, then ends."""
        self.closed = True
        self._not_empty.set()

    async def wait_for_room(self) -> None:
        """Wait until a message fits (with others, call only while `has_room` is False)."""
        self.waiters += 1
        try:
            await self.room.wait()
        finally:
            self.waiters -= 1
            self._not_empty.set()  # let a closing consumer re-check whether it is done

    async def get_batch(self, max_batch: int) -> list[_Message]:
        """Up to `max_batch` messages in order; [] once closed and drained."""
        while not self._items:
            if self.closed and self.waiters == 0:
                return []
            self._not_empty.clear()
            await self._not_empty.wait()
        count = min(max_batch, len(self._items))
        batch = [self._items.popleft() for _ in range(count)]
        self.room.set()
        return batch


class _Group(Subscription):
    """One consumer group: a partition and a consumer task per partition."""

    def __init__(
        self,
        pattern: str,
        name: str,
        handler: BatchHandler,
        settings: BusSettings,
        max_batch: int,
        on_close: Callable[[], None],
    ) -> None:
        self.pattern = pattern
        self.name = name
        self._handler = handler
        self._settings = settings
        self._max_batch = max_batch
        self._partitions = [
            _Partition(settings.partition_queue) for _ in range(settings.partitions)
        ]
        self._tasks = [
            asyncio.create_task(self._consume(p), name=f"bus.{name}.partition-{i}")
            for i, p in enumerate(self._partitions)
        ]
        self.closed = False
        self._on_close = on_close

    def partition_for(self, key: str) -> _Partition:
        return self._partitions[subjects.partition_of(key, len(self._partitions))]

    def depth(self) -> int:
        return sum(len(p) for p in self._partitions)

    async def close(self) -> None:
        """Drain every partition, then end the consumer tasks."""
        if self.closed:
            return
        self.closed = True
        self._on_close()
        for partition in self._partitions:
            partition.close()
        await asyncio.gather(*self._tasks)

    async def _consume(self, partition: _Partition) -> None:
        while batch := await partition.get_batch(self._max_batch):
            await self._deliver(batch)

    async def _deliver(self, batch: list[_Message]) -> None:
        attempt = 1
        while batch:
            deliveries = [_MemoryDelivery(m, attempt) for m in batch]
            try:
                await self._handler(deliveries)
            except Exception:
                log.exception(
                    "bus group %s: handler failed; the batch will be redelivered", self.name
                )
            batch, delay = self._settle(deliveries, attempt)
            if batch:
                attempt += 1
                await asyncio.sleep(delay)

    def _settle(
        self, deliveries: Sequence[_MemoryDelivery], attempt: int
    ) -> tuple[list[_Message], float]:
        retry: list[_Message] = []
        delay = 0.0
        for d in deliveries:
            if d.state == "ack":
                d.message.group_done()
            elif d.state == "term":
                d.message.give_up(d.reason or f"terminated by group {self.name}")
            elif attempt >= self._settings.max_deliver:
                d.message.give_up(f"group {self.name} failed it {attempt} times")
            else:
                retry.append(d.message)
                delay = max(delay, d.delay)
        return retry, delay


class MemoryBus(Bus):
    """In-process bus; see the module docstring."""

    def __init__(self, settings: BusSettings) -> None:
        self._settings = settings
        self._groups: list[_Group] = []
        self._routes: dict[tuple[str, str], list[_Partition]] = {}
        self._running = False

    async def start(self) -> None:
        self._running = True

    async def stop(self) -> None:
        self._running = False
        groups, self._groups = self._groups, []
        for group in groups:
            await group.close()

    def depth(self) -> int:
        """Messages queued on every group (for health and metrics)."""
        return sum(g.depth() for g in self._groups)

    async def subscribe(
        self, pattern: str, group: str, handler: BatchHandler, *, max_batch: int | None = None
    ) -> Subscription:
        if any(g.name == group and g.pattern == pattern for g in self._groups):
            raise BusError(
                f"group {group!r} already consumes {pattern!r}: "
                "the in-process bus runs one consumer per partition itself"
            )
        sub = _Group(
            pattern,
            group,
            handler,
            self._settings,
            max_batch or self._settings.max_batch,
            self._routes.clear,
        )
        self._groups.append(sub)
        self._routes.clear()
        return sub

    def _partitions(self, subject: str, key: str) -> list[_Partition]:
        if not self._running:
            raise BusError("the bus is stopped")
        route = self._routes.get((subject, key))
        if route is not None:
            return route
        groups = [g for g in self._groups if not g.closed and subjects.matches(g.pattern, subject)]
        if not groups:
            raise BusError(f"no consumer group takes subject {subject!r}")
        if len(self._routes) >= _MAX_ROUTES:
            self._routes.clear()
        route = self._routes[(subject, key)] = [group.partition_for(key) for group in groups]
        return route

    def publish_nowait(
        self,
        subject: str,
        data: bytes,
        *,
        key: str,
        msg_id: str,
        on_done: Callable[[BaseException | None], None],
    ) -> bool:
        try:
            partitions = self._partitions(subject, key)
        except BusError:
            return False  # `publish` raises it
        for partition in partitions:  # a loop, not all(genexpr): this runs per message
            if not partition.has_room():
                return False
        message = _Message(subject, key, data, msg_id, len(partitions), on_done)
        for partition in partitions:
            partition.put_nowait(message)
        return True

    async def publish(
        self, subject: str, data: bytes, *, key: str, msg_id: str, timeout: float | None = None
    ) -> None:
        partitions = self._partitions(subject, key)
        try:
            async with asyncio.timeout(timeout):
                while full := [p for p in partitions if not p.has_room()]:
                    await full[0].wait_for_room()
        except TimeoutError:
            raise Overloaded("the pipeline is full; retry later") from None
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def settle(error: BaseException | None) -> None:
            if done.done():
                return
            if error is None:
                done.set_result(None)
            else:
                done.set_exception(error)

        message = _Message(subject, key, data, msg_id, len(partitions), settle)
        for partition in partitions:
            partition.put_nowait(message)
        await done
