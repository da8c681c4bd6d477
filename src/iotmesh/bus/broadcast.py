"""Broadcast: live, at-most-once messages to every process that shares the bus's engine.

Not the bus: nothing is stored or acknowledged, and a process that is not subscribed
when a message is published never gets it. That fits pushes to live device sessions
(shared-attribute changes, RPC wake-ups and completions), whose truth is in the state
store: a session that (re)attaches reads it from there, so a lost broadcast costs a
push, never data. A subscriber is told when it may have missed messages (its
connection was re-established: the handler gets `None`), to re-check what it waits for.

- NATS (`nats_broadcast.py`): core pub/sub subjects `<ns>.live.<topic>` on the bus's
  own connection; no JetStream stream captures them.
- Redis (`redis_broadcast.py`): channels `<ns>:live:<topic>`, published through the
  bus's pool and read on a connection of their own.
- The in-process bus has none (`Bus.broadcast()` is None): one process sees
  everything, so nothing needs to cross.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable

from iotmesh.bus.interface import Subscription

BroadcastHandler = Callable[[bytes | None], Awaitable[None]]
"""Called with each message of a topic, in order; with None when messages may have
been missed. It should return soon: the next message waits for it."""


class Broadcast(abc.ABC):
    """Fan-out of live messages to every subscribed process (this one included)."""

    @abc.abstractmethod
    async def publish(self, topic: str, data: bytes) -> None:
        """Send `data` to every current subscriber of `topic`.

        Raises:
            BusError: the engine is unreachable or the bus is stopped.
        """

    @abc.abstractmethod
    async def subscribe(self, topic: str, handler: BroadcastHandler) -> Subscription:
        """Start calling `handler` with every message of `topic` until closed.

        Returns once subscribed, or after the engine's request timeout (the
        subscription then keeps trying in the background and reports a gap once it is
        through).
        """
