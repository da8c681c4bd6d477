"""Token buckets in Redis: per-device rate limits shared by several processes (the
`transports.ratelimit.RateLimiter` seam).

One hash `<ns>:rate:<key>` per bucket (`tokens`, `at` in Redis microseconds), taken
from by one script, atomically, with Redis's clock (processes' clocks may differ); it
expires once it would be full again, so idle devices cost nothing. The arithmetic is
the local limiter's (a debt and a pause, never a drop).

Error handling: while Redis is down or slow (`timeout_s`), `take` answers from a
local bucket of the same rate (counted as `errors_rate_limit`): each process then
limits on its own.
"""

from __future__ import annotations

from typing import Any, Protocol

from iotmesh.storage.redis.client import HotState, HotStateError

# KEYS: bucket. ARGV: rate per s, burst, cost. Returns the pause in s (a string: Redis
# would truncate a Lua number to an integer).
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local rate, burst, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local b = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(b[1]) or burst
local at = tonumber(b[2]) or now
tokens = math.min(burst, tokens + (now - at) / 1000000 * rate) - cost
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate * 1000) + 1000)
if tokens >= 0 then return '0' end
return tostring(-tokens / rate)
"""


class _Fallback(Protocol):
    def take_now(self, key: str, cost: int = 1) -> float: ...


class RedisRateLimiter:
    """`RateLimiter` on Redis; `fallback` (a `LocalRateLimiter` of the same limit)
    answers while Redis cannot."""

    def __init__(self, hot: HotState, rate: float, burst: int, fallback: _Fallback) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a rate limit needs rate > 0 and burst >= 1")
        self._hot = hot
        self.rate = rate
        self.burst = burst
        self._fallback = fallback
        self._script: Any = None

    async def take(self, key: str, cost: int = 1) -> float:
        if self._script is None:
            self._script = self._hot.redis.register_script(_TAKE)
        try:
            pause = await self._hot.call(
                "rate_limit",
                self._script(keys=[self._hot.key("rate", key)], args=[self.rate, self.burst, cost]),
            )
        except HotStateError:
            return self._fallback.take_now(key, cost)
        return float(pause)
