"""EventLoopLag: a loop blocked by a callback shows as lag, a stall and a window maximum."""

from __future__ import annotations

import asyncio
import time

from iotmesh.core.loop_lag import STALL_MS, EventLoopLag


async def test_a_blocked_loop_shows_as_lag_and_a_stall() -> None:
    async with EventLoopLag(interval_s=0.01) as lag:
        await asyncio.sleep(0.05)
        # A callback hogging the loop, as a slow handler would.
        asyncio.get_running_loop().call_soon(time.sleep, 0.25)
        await asyncio.sleep(0.35)
        stats = lag.stats()
    assert stats["stalls"] >= 1
    assert stats["lag_max_ms"] >= 200
    assert stats["samples"] >= 3
    assert stats["lag_ms_total"] >= stats["lag_max_ms"] >= STALL_MS


def test_the_window_maximum_forgets_old_lag_but_the_counters_do_not() -> None:
    now = [0.0]
    lag = EventLoopLag(window_s=10.0, clock=lambda: now[0])
    lag.record(150.0)
    now[0] = 5.0
    lag.record(2.0)
    assert lag.stats()["lag_max_ms"] == 150.0
    now[0] = 10.5
    lag.record(3.0)
    stats = lag.stats()
    assert stats["lag_max_ms"] == 3.0
    assert stats["stalls"] == 1
    assert stats["samples"] == 3
    assert stats["lag_ms_total"] == 155.0
