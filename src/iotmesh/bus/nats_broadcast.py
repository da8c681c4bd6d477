"""Broadcast on NATS core pub/sub: subjects `<ns>.live.<topic>` on the bus's connection.

Core NATS delivers to whoever is subscribed at that moment and keeps nothing, which is
the contract of `Broadcast`. The client re-subscribes by itself after a reconnect;
what was published meanwhile is lost, so each subscriber is then told (`None`).

Error handling: a publish on a closed or over-full connection raises `BusError`; a
handler that raises is logged and the next message is handled.
Resource handling: a subscription is closed by its owner, before the bus stops.
"""

from __future__ import annotations

import logging

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscription

from iotmesh.bus.broadcast import Broadcast, BroadcastHandler
from iotmesh.bus.interface import BusError, Subscription
from iotmesh.bus.subjects import LIVE

log = logging.getLogger(__name__)


class _Sub(Subscription):
    def __init__(self, owner: NatsBroadcast, handler: BroadcastHandler) -> None:
        self._owner = owner
        self.handler = handler
        self.sub: NatsSubscription | None = None

    async def deliver(self, msg: Msg) -> None:
        await self.call(msg.data)

    async def call(self, data: bytes | None) -> None:
        try:
            await self.handler(data)
        except Exception:
            log.exception("a broadcast handler failed")

    async def close(self) -> None:
        sub, self.sub = self.sub, None
        self._owner.subs.discard(self)
        if sub is not None:
            try:
                await sub.unsubscribe()
            except nats.errors.Error as exc:  # the connection is gone: so is the interest
                log.debug("unsubscribing a broadcast: %s", exc)


class NatsBroadcast(Broadcast):
    """See the module docstring. `reconnected` is the connection's reconnect callback."""

    def __init__(self, client: Client, namespace: str) -> None:
        self._nc = client
        self._ns = namespace
        self.subs: set[_Sub] = set()

    def subject(self, topic: str) -> str:
        return f"{self._ns}.{LIVE}.{topic}"

    async def publish(self, topic: str, data: bytes) -> None:
        try:
            await self._nc.publish(self.subject(topic), data)
        except nats.errors.Error as exc:
            raise BusError(f"cannot broadcast on {topic}: {exc}") from exc

    async def subscribe(self, topic: str, handler: BroadcastHandler) -> Subscription:
        sub = _Sub(self, handler)
        try:
            sub.sub = await self._nc.subscribe(self.subject(topic), cb=sub.deliver)
            await self._nc.flush()  # the server has the interest: nothing later is missed
        except (nats.errors.Error, TimeoutError) as exc:
            raise BusError(f"cannot subscribe to broadcasts on {topic}: {exc}") from exc
        self.subs.add(sub)
        return sub

    async def reconnected(self) -> None:
        """Tell every subscriber that messages may have been missed."""
        for sub in list(self.subs):
            await sub.call(None)
