"""Token buckets in the local Redis: one limit for a device across processes; a local
bucket while Redis is down."""

from __future__ import annotations

import pytest

from iotmesh.storage.redis import RedisRateLimiter
from iotmesh.transports.ratelimit import LocalRateLimiter
from tests.redis_hot import HotFactory, dead_port

RATE = 0.01  # so slow that no token comes back during a test
BURST = 5


async def _limiter(redis_hot: HotFactory, **hot: object) -> RedisRateLimiter:
    return RedisRateLimiter(await redis_hot(**hot), RATE, BURST, LocalRateLimiter(RATE, BURST))


async def test_processes_share_a_bucket(redis_hot: HotFactory) -> None:
    mqtt, http = await _limiter(redis_hot), await _limiter(redis_hot)
    pauses = [await (mqtt if n % 2 else http).take("dev-1") for n in range(BURST)]
    assert pauses == [0.0] * BURST
    over = await mqtt.take("dev-1")
    assert over == pytest.approx(1 / RATE, rel=0.01)  # one token of debt
    assert await http.take("dev-1") == pytest.approx(2 / RATE, rel=0.01)
    assert await http.take("dev-2") == 0.0  # buckets are per key


async def test_a_bucket_expires_once_full_again(redis_hot: HotFactory) -> None:
    hot = await redis_hot()
    limiter = RedisRateLimiter(hot, 1000.0, 10, LocalRateLimiter(1000.0, 10))
    await limiter.take("d", cost=10)
    ttl = await hot.redis.pttl(hot.key("rate", "d"))
    assert 0 < ttl <= 1010  # 10 tokens at 1000/s, plus a second


async def test_redis_down_limits_locally(redis_hot: HotFactory) -> None:
    limiter = await _limiter(redis_hot, url=f"redis://127.0.0.1:{dead_port()}/15", timeout_s=0.3)
    assert [await limiter.take("d") for _ in range(BURST)] == [0.0] * BURST
    assert await limiter.take("d") > 0
