"""The cluster on Redis: registry, leader leases with fencing tokens, fences.

Layout, `ns` being `cluster.namespace`:

- `<ns>:cluster:svc:<service>.<instance>`: an instance record (JSON), `PX ttl_s`.
- `<ns>:cluster:members`: sorted set of `<service>.<instance>` scored by the expiry of
  its record (Redis server time), so listing is one ZRANGEBYSCORE plus one MGET
  without a SCAN; members whose record expired are pruned on each write.
- `<ns>:cluster:lease:<name>`: `<owner>#<token>`, `PX lease_s`;
  `<ns>:cluster:term:<name>`: the fencing counter (INCR; never expires).
- `<ns>:cluster:fence:<resource>`: hash {token, value} of the last fenced write.

The listing script reads record keys it does not declare, which a single Redis (as the
bus also assumes) allows and Redis Cluster would not.
"""

from __future__ import annotations

import builtins
from typing import Any

import msgspec
import redis.asyncio as aioredis
import redis.exceptions

from iotmesh.cluster import model
from iotmesh.cluster.backend import ClusterBackend
from iotmesh.cluster.errors import ClusterError, StaleToken
from iotmesh.cluster.model import Instance
from iotmesh.core.settings import ClusterSettings
from iotmesh.engines.redis import RedisLeases

# KEYS: record, members. ARGV: member, record, ttl ms.
_PUT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
return 1
"""

# KEYS: members. ARGV: record key prefix, member prefix. Live records.
_LIST = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')) do
  if string.sub(m, 1, #ARGV[2]) == ARGV[2] then
    local v = redis.call('GET', ARGV[1] .. m)
    if v then table.insert(out, v) end
  end
end
return out
"""

# KEYS: lease, counter. ARGV: owner, ttl ms. The token, or 0 when the lease is held.
_ACQUIRE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. '#' .. token, 'PX', ARGV[2])
return token
"""

# KEYS: fence hash. ARGV: token, value. -1 when written, else the higher token seen.
_FENCED_WRITE = """
local seen = tonumber(redis.call('HGET', KEYS[1], 'token'))
local token = tonumber(ARGV[1])
if seen and token < seen then return seen end
redis.call('HSET', KEYS[1], 'token', ARGV[1], 'value', ARGV[2])
return -1
"""


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


class RedisCluster(ClusterBackend):
    """See the module docstring."""

    name = "cluster.redis"

    def __init__(self, settings: ClusterSettings, url: str) -> None:
        self.settings = settings
        self._url = url
        self._ns = f"{settings.namespace}:cluster"
        self._redis: aioredis.Redis | None = None

    @property
    def redis(self) -> aioredis.Redis:
        if self._redis is None:
            raise ClusterError("the cluster backend is stopped")
        return self._redis

    async def start(self) -> None:
        r = aioredis.Redis.from_url(
            self._url, socket_connect_timeout=5.0, socket_timeout=5.0, protocol=2
        )
        try:
            await r.ping()
        except (OSError, redis.exceptions.RedisError) as exc:
            await r.aclose()
            raise ClusterError(f"cannot connect to Redis at {self._url}: {exc}") from exc
        self._redis = r
        self._leases = RedisLeases(r)
        self._put = r.register_script(_PUT)
        self._list = r.register_script(_LIST)
        self._acquire = r.register_script(_ACQUIRE)
        self._fenced = r.register_script(_FENCED_WRITE)

    async def stop(self) -> None:
        r, self._redis = self._redis, None
        if r is not None:
            await r.aclose()

    async def _call(self, what: str, aw: Any) -> Any:
        try:
            return await aw
        except (OSError, redis.exceptions.RedisError) as exc:
            raise ClusterError(f"Redis: {what} failed: {exc}") from exc

    # -- registry -----------------------------------------------------------------

    async def put(self, instance: Instance) -> None:
        keys = [f"{self._ns}:svc:{instance.key}", f"{self._ns}:members"]
        args: list[Any] = [instance.key, model.encode(instance), _ms(self.settings.ttl_s)]
        await self._call("registering", self._put(keys=keys, args=args))

    async def remove(self, service: str, instance_id: str) -> None:
        member = f"{service}.{instance_id}"
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(f"{self._ns}:svc:{member}")
        pipe.zrem(f"{self._ns}:members", member)
        await self._call("deregistering", pipe.execute())

    async def list(self, service: str | None = None) -> builtins.list[Instance]:
        prefix = f"{service}." if service else ""
        raw = await self._call(
            "listing",
            self._list(keys=[f"{self._ns}:members"], args=[f"{self._ns}:svc:", prefix]),
        )
        found = []
        for data in raw:
            try:
                found.append(model.decode(data))
            except msgspec.DecodeError:
                continue  # not ours, or from an incompatible version: not listed
        return sorted(found, key=lambda i: i.key)

    # -- leases -------------------------------------------------------------------

    async def acquire(self, name: str, owner: str, ttl_s: float) -> int | None:
        keys = [f"{self._ns}:lease:{name}", f"{self._ns}:term:{name}"]
        token = int(await self._call("acquire", self._acquire(keys=keys, args=[owner, _ms(ttl_s)])))
        return token or None

    async def renew(self, name: str, owner: str, token: int, ttl_s: float) -> bool:
        key = f"{self._ns}:lease:{name}"
        return bool(
            await self._call("renew", self._leases.renew(key, f"{owner}#{token}", _ms(ttl_s)))
        )

    async def release(self, name: str, owner: str, token: int) -> None:
        key = f"{self._ns}:lease:{name}"
        await self._call("release", self._leases.release(key, f"{owner}#{token}"))

    async def holder(self, name: str) -> tuple[str, int] | None:
        value = await self._call("holder", self.redis.get(f"{self._ns}:lease:{name}"))
        if value is None:
            return None
        owner, _, token = value.decode().rpartition("#")
        return owner, int(token)

    # -- fences -------------------------------------------------------------------

    async def write(self, resource: str, token: int, value: bytes) -> None:
        key = f"{self._ns}:fence:{resource}"
        seen = int(await self._call("fenced write", self._fenced(keys=[key], args=[token, value])))
        if seen >= 0:
            raise StaleToken(resource, token, seen)

    async def read(self, resource: str) -> tuple[int, bytes] | None:
        got = await self._call(
            "fence read", self.redis.hmget(f"{self._ns}:fence:{resource}", ["token", "value"])
        )
        if got[0] is None:
            return None
        return int(got[0]), bytes(got[1] or b"")

    async def delete_everything(self) -> None:
        keys = [k async for k in self.redis.scan_iter(match=f"{self._ns}:*", count=1000)]
        for i in range(0, len(keys), 500):
            await self.redis.delete(*keys[i : i + 500])
