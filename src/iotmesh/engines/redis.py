"""Redis helpers: leases with a TTL, and a pub/sub reader that never gives up.

Leases: `SET key owner NX PX ttl` takes a free lease; renewing and releasing compare
the value first (in Lua, so atomically), so a holder whose lease lapsed and was taken
by another can neither extend nor delete the new holder's lease. Used by the bus
(partition leases) and the cluster (leader leases, which also draw a fencing token).

`PubSubReader`: channels read on a connection of their own (no read timeout: a quiet
channel is no error), re-subscribed with back-off when it drops; pub/sub keeps nothing
for the absent, so the reader then reports a gap. Used by the bus's broadcasts and the
hot state's RPC wake-ups.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence

import redis.asyncio as aioredis
import redis.exceptions

from iotmesh.core.lifecycle import cancel_task

log = logging.getLogger(__name__)

BACKOFF_MAX_S = 5.0

# KEYS: lease. ARGV: value, ttl ms.
RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

# KEYS: lease. ARGV: value.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisLeases:
    """Acquire, renew and release TTL leases (`value` identifies the holder)."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._redis = client
        self._renew = client.register_script(RENEW)
        self._release = client.register_script(RELEASE)

    async def acquire(self, key: str, value: str, ttl_ms: int) -> bool:
        """Take the lease if nobody holds it."""
        return bool(await self._redis.set(key, value, nx=True, px=ttl_ms))

    async def renew(self, key: str, value: str, ttl_ms: int) -> bool:
        """Extend a lease held as `value`; False if it is no longer held so."""
        return bool(await self._renew(keys=[key], args=[value, ttl_ms]))

    async def release(self, key: str, value: str) -> None:
        """Delete the lease if it is still held as `value`."""
        await self._release(keys=[key], args=[value])


class PubSubReader:
    """Calls `on_message(channel, data)` for every message of `channels`, in order, from
    one task; `on_gap()` after a re-subscription; `on_error(exc)` for each failure.

    Resource handling: `start` starts the task (and waits up to `wait_s` for the first
    subscription), `stop` cancels it and closes its connection.
    """

    def __init__(
        self,
        url: str,
        channels: Sequence[str],
        on_message: Callable[[str, bytes], Awaitable[None]],
        on_gap: Callable[[], Awaitable[None]],
        on_error: Callable[[BaseException], None],
        *,
        connect_timeout_s: float,
        name: str,
    ) -> None:
        self._url = url
        self._channels = list(channels)
        self._on_message = on_message
        self._on_gap = on_gap
        self._on_error = on_error
        self._connect_timeout_s = connect_timeout_s
        self._name = name
        self._task: asyncio.Task[None] | None = None
        self.subscribed = asyncio.Event()

    async def start(self, wait_s: float) -> None:
        self._task = asyncio.create_task(self._read(), name=self._name)
        # A message published right after start-up should not be missed: wait a little
        # for the subscription (not failing: it is retried in the background).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait_s):
                await self.subscribed.wait()

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_task(task)

    async def _read(self) -> None:
        backoff = 0.1
        attempt = 0
        while True:
            attempt += 1
            client = aioredis.Redis.from_url(
                self._url,
                socket_connect_timeout=self._connect_timeout_s,
                socket_timeout=None,
                protocol=2,
            )
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(*self._channels)
                self.subscribed.set()
                if attempt > 1:
                    await self._on_gap()
                backoff = 0.1
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        await self._deliver(message["channel"], message["data"])
            except (OSError, redis.exceptions.RedisError) as exc:
                self.subscribed.clear()
                self._on_error(exc)
            finally:
                with contextlib.suppress(OSError, redis.exceptions.RedisError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
                    await client.aclose()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def _deliver(self, channel: bytes | str, data: bytes | str) -> None:
        try:
            await self._on_message(
                channel.decode() if isinstance(channel, bytes) else channel,
                data if isinstance(data, bytes) else data.encode(),
            )
        except Exception:  # the reader goes on with the next message
            log.exception("handling a message of Redis channel %r failed", channel)
