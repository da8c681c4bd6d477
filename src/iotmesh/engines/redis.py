"""Leases on Redis: a key holding its owner, with a TTL.

`SET key owner NX PX ttl` takes a free lease; renewing and releasing compare the value
first (in Lua, so atomically), so a holder whose lease lapsed and was taken by another
can neither extend nor delete the new holder's lease. Used by the bus (partition
leases) and the cluster (leader leases, which also draw a fencing token).
"""

from __future__ import annotations

import redis.asyncio as aioredis

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
