"""One Redis connection pool for every kind of hot state (`storage.redis`).

Hot state is a cache and a messenger, never the only copy of anything: the stores
hold what is durable. So a Redis that is down or slow must not stop devices: every
user goes through `HotState.call`, which bounds each round trip by
`storage.redis.timeout_s`, turns any Redis or socket error into `HotStateError`
(which the callers catch and count) and keeps the counters `/stats` shows.

Error handling: start-up does not fail when Redis is unreachable (it is logged);
redis-py reconnects on the next command. Errors are logged at most once per
`LOG_EVERY_S` per kind, so an outage does not flood the log.
Resource handling: `start` makes the pool, `stop` closes it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

import redis.asyncio as aioredis
import redis.exceptions

from iotmesh.core.errors import IotmeshError
from iotmesh.core.lifecycle import Health, Service
from iotmesh.core.settings import RedisSettings

log = logging.getLogger(__name__)

T = TypeVar("T")

LOG_EVERY_S = 10.0


class HotStateError(IotmeshError):
    """Redis did not answer (down, slow, or refused a command)."""


class HotState(Service):
    """The Redis client of the hot-state parts, with their error counters."""

    name = "redis"

    def __init__(self, settings: RedisSettings) -> None:
        self.settings = settings
        self.ns = settings.namespace
        self._redis: aioredis.Redis | None = None
        self.errors: collections.Counter[str] = collections.Counter()
        self._logged: dict[str, float] = {}
        self._last_error = ""

    @property
    def redis(self) -> aioredis.Redis:
        if self._redis is None:
            raise HotStateError("the Redis client is stopped")
        return self._redis

    def key(self, *parts: str) -> str:
        """A key (or channel) name of this namespace: `<ns>:<part>:<part>...`."""
        return ":".join((self.ns, *parts))

    async def start(self) -> None:
        timeout = self.settings.timeout_s
        self._redis = aioredis.Redis.from_url(
            self.settings.url,
            socket_connect_timeout=timeout,
            socket_timeout=timeout,
            protocol=2,
        )
        try:
            await self.call("start", self.redis.ping())
        except HotStateError as exc:
            log.warning("Redis hot state unreachable at start-up (will retry): %s", exc)

    async def stop(self) -> None:
        r, self._redis = self._redis, None
        if r is not None:
            await r.aclose()

    def health(self) -> Health:
        # Redis down degrades reads to the store; the process itself stays healthy.
        detail = f"{sum(self.errors.values())} errors" + (
            f", last: {self._last_error}" if self._last_error else ""
        )
        return Health(ok=True, detail=detail)

    def stats(self) -> dict[str, Any]:
        return {f"errors_{kind}": n for kind, n in self.errors.items()}

    async def call(self, kind: str, op: Awaitable[T]) -> T:
        """Await a Redis operation within `timeout_s`; failures count under `kind`.

        Raises:
            HotStateError: Redis failed or did not answer in time.
        """
        try:
            async with asyncio.timeout(self.settings.timeout_s):
                return await op
        except (TimeoutError, OSError, redis.exceptions.RedisError) as exc:
            self.failed(kind, exc)
            raise HotStateError(f"Redis {kind}: {exc or type(exc).__name__}") from exc

    def failed(self, kind: str, exc: BaseException) -> None:
        """Count (and now and then log) a failure of `kind`."""
        self.errors[kind] += 1
        self._last_error = f"{kind}: {exc or type(exc).__name__}"
        now = time.monotonic()
        if now - self._logged.get(kind, -LOG_EVERY_S) >= LOG_EVERY_S:
            self._logged[kind] = now
            log.warning("Redis hot state, %s failed (%d so far): %r", kind, self.errors[kind], exc)

    async def delete_everything(self) -> None:
        """Delete every key of this namespace (tests)."""
        keys = [k async for k in self.redis.scan_iter(match=f"{self.ns}:*", count=1000)]
        for i in range(0, len(keys), 500):
            await self.redis.delete(*keys[i : i + 500])
