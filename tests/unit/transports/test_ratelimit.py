"""The local token buckets (`transports.ratelimit.LocalRateLimiter`) on a fake clock."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iotmesh.transports.ratelimit import LocalRateLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_a_burst_then_a_pause_that_pays_the_debt() -> None:
    clock = Clock()
    limiter = LocalRateLimiter(rate=2.0, burst=3, clock=clock)
    assert [await limiter.take("d") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert await limiter.take("d") == pytest.approx(0.5)  # one token of debt at 2/s
    assert await limiter.take("d") == pytest.approx(1.0)
    clock.now += 1.0  # the debt is paid
    assert await limiter.take("d") == pytest.approx(0.5)
    assert await limiter.take("other") == 0.0  # buckets are per key
    clock.now += 100
    assert await limiter.take("d", cost=3) == 0.0  # refilled up to the burst only
    assert await limiter.take("d") > 0


def test_a_limit_needs_a_rate_and_a_burst() -> None:
    with pytest.raises(ValueError, match="rate"):
        LocalRateLimiter(0, 1)


@given(
    rate=st.floats(0.1, 1000),
    burst=st.integers(1, 100),
    gaps=st.lists(st.floats(0, 2), min_size=1, max_size=200),
)
def test_no_more_pass_unpaused_than_burst_plus_refill(
    rate: float, burst: int, gaps: list[float]
) -> None:
    clock = Clock()
    limiter = LocalRateLimiter(rate, burst, clock=clock)
    start = clock.now
    passed = 0
    for gap in gaps:
        clock.now += gap
        if limiter.take_now("d") == 0.0:
            passed += 1
    assert passed <= burst + (clock.now - start) * rate + 1e-6
