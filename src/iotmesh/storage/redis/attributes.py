"""The attribute cache in Redis (`storage.redis.attribute_cache`): the
`devicestate.attributes.AttributeCache` of several processes.

Layout: `<ns>:attr:<device id>:<scope>` holds every attribute of the scope (msgpack),
expiring after `attribute_cache_ttl_s`; `<ns>:attr:<device id>:<scope>:gen` counts
invalidations. `read` returns the value and the count (one round trip); `fill` stores
only if the count is still the same (a script), so a reader that read the store
before a change was committed cannot cache the replaced values; `invalidate`
increments the count and deletes the value.

Error handling: `HotStateError` (counted) from every method; the service bypasses.
"""

from __future__ import annotations

from typing import Any

import msgspec

from iotmesh.core.types import Attribute, AttributeScope
from iotmesh.storage.redis.client import HotState

# KEYS: value, gen. ARGV: the gen read, the value, TTL ms.
_FILL = """
if (redis.call('GET', KEYS[2]) or '0') ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
"""

_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(list[Attribute]).decode


class RedisAttributeCache:
    """`AttributeCache` on Redis; see the module docstring."""

    def __init__(self, hot: HotState) -> None:
        self._hot = hot
        self._ttl_ms = int(hot.settings.attribute_cache_ttl_s * 1000)
        self._fill: Any = None

    def _keys(self, device_id: str, scope: AttributeScope) -> tuple[str, str]:
        key = self._hot.key("attr", device_id, scope.value)
        return key, f"{key}:gen"

    async def read(
        self, device_id: str, scope: AttributeScope
    ) -> tuple[list[Attribute] | None, bytes]:
        reply: list[Any] = await self._hot.call(
            "attributes_read", self._hot.redis.mget(self._keys(device_id, scope))
        )
        value, gen = reply
        return (None if value is None else _decode(value)), (gen or b"0")

    async def fill(
        self, device_id: str, scope: AttributeScope, attributes: list[Attribute], token: bytes
    ) -> None:
        if self._fill is None:
            self._fill = self._hot.redis.register_script(_FILL)
        args = [token, _encode(attributes), self._ttl_ms]
        await self._hot.call(
            "attributes_fill", self._fill(keys=self._keys(device_id, scope), args=args)
        )

    async def invalidate(self, device_id: str, scope: AttributeScope) -> None:
        value, gen = self._keys(device_id, scope)
        pipe = self._hot.redis.pipeline(transaction=True)
        pipe.incr(gen)
        pipe.pexpire(gen, self._ttl_ms * 2)
        pipe.delete(value)
        await self._hot.call("attributes_invalidate", pipe.execute())
