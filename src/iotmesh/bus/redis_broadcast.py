"""Broadcast on Redis pub/sub: channels `<ns>:live:<topic>` of the bus's Redis.

Published through the bus's connection pool; each subscription reads its channel on a
connection of its own (`engines.redis.PubSubReader`), re-subscribed with back-off when
it drops, after which its handler is told that messages may have been missed.

Error handling: a publish that fails raises `BusError`; a failing subscription is
logged (at most once per `LOG_EVERY_S`) and retried forever.
Resource handling: closing a subscription stops its reader and closes its connection.
"""

from __future__ import annotations

import logging
import time

import redis.asyncio as aioredis
import redis.exceptions

from iotmesh.bus.broadcast import Broadcast, BroadcastHandler
from iotmesh.bus.interface import BusError, Subscription
from iotmesh.bus.subjects import LIVE
from iotmesh.engines.redis import PubSubReader

log = logging.getLogger(__name__)

LOG_EVERY_S = 10.0


class _Sub(Subscription):
    def __init__(self, reader: PubSubReader) -> None:
        self.reader = reader

    async def close(self) -> None:
        await self.reader.stop()


class RedisBroadcast(Broadcast):
    """See the module docstring."""

    def __init__(self, client: aioredis.Redis, url: str, namespace: str, timeout_s: float) -> None:
        self._redis = client
        self._url = url
        self._ns = namespace
        self._timeout_s = timeout_s
        self._logged = -LOG_EVERY_S

    def channel(self, topic: str) -> str:
        return f"{self._ns}:{LIVE}:{topic}"

    async def publish(self, topic: str, data: bytes) -> None:
        try:
            await self._redis.publish(self.channel(topic), data)
        except (OSError, redis.exceptions.RedisError) as exc:
            raise BusError(f"cannot broadcast on {topic}: {exc}") from exc

    async def subscribe(self, topic: str, handler: BroadcastHandler) -> Subscription:
        async def on_message(channel: str, data: bytes) -> None:
            await handler(data)

        async def on_gap() -> None:
            await handler(None)

        reader = PubSubReader(
            self._url,
            [self.channel(topic)],
            on_message,
            on_gap,
            self._failed,
            connect_timeout_s=self._timeout_s,
            name=f"broadcast.{topic}",
        )
        await reader.start(self._timeout_s)
        return _Sub(reader)

    def _failed(self, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._logged >= LOG_EVERY_S:
            self._logged = now
            log.warning("Redis broadcast subscription failed (retrying): %r", exc)
