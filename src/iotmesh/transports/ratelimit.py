"""Per-device rate limits as token buckets, local or shared by several processes.

A bucket holds up to `burst` tokens and refills at `rate` per second; each message
takes one (or `cost`). Taking from an empty bucket is allowed but leaves a debt, and
the answer is how long the caller should pause (stop reading the device's socket,
answer "retry later") until the debt is paid: the limit slows a device, it never
drops what it sent. This is the arithmetic of the MQTT server's per-connection limit
(`mqtt.rate_limit`, `transports/mqtt/connection.py`), which keeps its own inline copy
on the hot path (one per socket read, no lookup).

`RateLimiter` is the seam for limits that must hold across processes (a device that
reconnects to another MQTT process, or posts over HTTP to several): `LocalRateLimiter`
here, `storage.redis.ratelimit.RedisRateLimiter` for many processes (one atomic
script per take, falling back to a local bucket while Redis is down).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from typing import Protocol

MAX_BUCKETS = 100_000


class RateLimiter(Protocol):
    """Token buckets by key (a device id); see the module docstring."""

    async def take(self, key: str, cost: int = 1) -> float:
        """Take `cost` tokens from `key`'s bucket: 0.0 when there were enough, else
        the seconds to pause until the debt is paid."""
        ...


class LocalRateLimiter:
    """`RateLimiter` in this process's memory: at most `MAX_BUCKETS` buckets, the least
    recently used dropped first (a dropped bucket comes back full)."""

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a rate limit needs rate > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._buckets: collections.OrderedDict[str, tuple[float, float]] = collections.OrderedDict()

    def take_now(self, key: str, cost: int = 1) -> float:
        """`take`, synchronously."""
        now = self._clock()
        tokens, at = self._buckets.pop(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate) - cost
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > MAX_BUCKETS:
            self._buckets.popitem(last=False)
        return 0.0 if tokens >= 0 else -tokens / self.rate

    async def take(self, key: str, cost: int = 1) -> float:
        return self.take_now(key, cost)
