"""Publisher and Subscriber: the seam every bus implementation fits.

Semantics (shared with NATS JetStream and Redis Streams, so the interface fits them):

- A message has a subject, a partition key and opaque bytes. The key (a device id)
  picks the partition, and a partition is consumed by one consumer at a time in order,
  so per-device order holds however many consumers a group has.
- `publish` returns when the bus guarantees the message will be delivered: for a
  durable engine when it is stored, for the in-process bus (which stores nothing) when
  every subscribed group has acknowledged it. Transports acknowledge devices only then.
- Consumers join a named group; each message goes to one consumer of each group
  (competing consumers) and every group gets every message (fan-out).
- Delivery is at least once: a handler settles each `Delivery` with `ack` (done),
  `nack` (redeliver later) or `term` (never redeliver; it is dead-lettered). A delivery
  left unsettled when the handler returns or raises is nacked. After `max_deliver`
  attempts a message is dead-lettered. Handlers receive batches so that the pipeline
  can commit many messages in one transaction.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Self

from iotmesh.core.errors import IotmeshError

if TYPE_CHECKING:
    from iotmesh.bus.broadcast import Broadcast


class BusError(IotmeshError):
    """A message could not be handed to the bus or was given up by its consumers."""


class DeadLettered(BusError):
    """Every attempt to process the message failed, or a consumer terminated it."""


class Delivery(abc.ABC):
    """One delivery of one message to one consumer."""

    subject: str
    key: str
    data: bytes
    msg_id: str
    attempt: int

    @abc.abstractmethod
    def ack(self) -> None:
        """The message is processed; it will not be delivered again."""

    @abc.abstractmethod
    def nack(self, delay: float = 0.0) -> None:
        """Processing failed for now; deliver the message again after `delay` seconds."""

    @abc.abstractmethod
    def term(self, reason: str = "") -> None:
        """The message can never be processed; dead-letter it and do not redeliver."""

    @property
    @abc.abstractmethod
    def settled(self) -> bool:
        """Whether ack, nack or term was called."""


class RecordedDelivery(Delivery):
    """A Delivery that records how its handler settled it, for a bus that acts on the
    outcome once the handler returns (`state`: pending, ack, nack or term; `delay` of a
    nack; `reason` of a term). Subclasses set the message fields, `_state = "pending"`,
    `delay = 0.0` and `reason = ""` in their own `__init__` (no super call on the hot path).
    """

    _state: str
    delay: float
    reason: str

    def ack(self) -> None:
        self._state = "ack"

    def nack(self, delay: float = 0.0) -> None:
        self._state = "nack"
        self.delay = delay

    def term(self, reason: str = "") -> None:
        self._state = "term"
        self.reason = reason

    @property
    def settled(self) -> bool:
        return self._state != "pending"

    @property
    def state(self) -> str:
        return self._state


BatchHandler = Callable[[Sequence[Delivery]], Awaitable[None]]


class Subscription(abc.ABC):
    """A running consumer; close it to stop consuming (in-flight batches finish first)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop taking new messages and wait for the handler to finish its batch."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class Publisher(abc.ABC):
    """The sending half of a bus."""

    @abc.abstractmethod
    async def publish(
        self, subject: str, data: bytes, *, key: str, msg_id: str, timeout: float | None = None
    ) -> None:
        """Hand a message to the bus; return when its delivery is guaranteed.

        Args:
            subject: dotted subject, e.g. `telemetry.<device id>`.
            data: the encoded message.
            key: partition key (the device id): messages with one key stay in order.
            msg_id: unique id, used by durable engines to drop duplicate publishes.
            timeout: longest wait for room on the bus; None waits as long as needed.

        Raises:
            Overloaded: no room within `timeout`; the message was not published.
            DeadLettered: (in-process bus) a consumer group gave the message up.
            BusError: no consumer group takes the subject, or the bus is closed.
        """

    def publish_nowait(
        self,
        subject: str,
        data: bytes,
        *,
        key: str,
        msg_id: str,
        on_done: Callable[[BaseException | None], None],
    ) -> bool:
        """Start a publish without awaiting it, if the bus can take the message at once.

        Returns True if it took the message: `on_done(None)` is then called when
        `publish` would have returned, or `on_done(error)` with what it would have
        raised, in either case exactly once, possibly from inside a consumer's settle.
        False when the bus cannot take the message right now (no room, or no such fast
        path): then call `publish`. A transport that hands over one message per socket
        read saves a task and a loop turn per message this way; the in-process bus
        implements it, engines with a network round trip need not.
        """
        return False


class Subscriber(abc.ABC):
    """The receiving half of a bus."""

    @abc.abstractmethod
    async def subscribe(
        self, pattern: str, group: str, handler: BatchHandler, *, max_batch: int | None = None
    ) -> Subscription:
        """Start consuming `pattern` (NATS wildcards `*` and `>`) as a member of `group`."""


class Bus(Publisher, Subscriber):
    """Both halves, as one object with a lifecycle."""

    name = "bus"

    @abc.abstractmethod
    async def start(self) -> None:
        """Connect (or get ready); return when publish and subscribe work."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Close every subscription and release the connection."""

    def broadcast(self) -> Broadcast | None:
        """Live, at-most-once fan-out to every process on this engine (`broadcast.py`),
        once started; None for a bus inside one process, which needs none."""
        return None
