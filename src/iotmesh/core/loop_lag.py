"""How late the event loop runs: the first thing to look at when latency grows.

Every transport, the pipeline and the commits of one process share one asyncio loop.
When a callback hogs it, or the loop has more ready work per turn than it can do in
time, every device's latency grows by the same amount, and nothing else shows why.
`EventLoopLag` measures that directly: a task asks to wake every `interval_s` and
records how late it woke (the time everything ahead of it in the loop took).

`stats()` (`/metrics` as `iotmesh_event_loop_*`, `/api/v1/stats`):

- `lag_ms`: the latest lateness;
- `lag_max_ms`: the largest in the last `window_s` (10 s), whoever scraped before;
- `stalls`: wake-ups at least `STALL_MS` late (a counter);
- `lag_ms_total` and `samples` (counters): `rate(lag_ms_total) / rate(samples)` is the
  mean lateness over any range.

Cost: one timer every 100 ms. Resource handling: one named task, cancelled in `stop`.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from typing import Any

from iotmesh.core.lifecycle import Service, cancel_task

STALL_MS = 100.0


class EventLoopLag(Service):
    """Measures the lateness of this process's event loop; see the module docstring."""

    name = "event_loop"
    stats_counters = frozenset({"stalls", "lag_ms_total", "samples"})

    def __init__(
        self,
        interval_s: float = 0.1,
        window_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval_s = interval_s
        self._clock = clock
        # (when, lag_ms) of the window's samples, oldest first; the last is the latest.
        self._recent: collections.deque[tuple[float, float]] = collections.deque()
        self._window_s = window_s
        self._stalls = 0
        self._lag_ms_total = 0.0
        self._samples = 0
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._watch(), name="event-loop-lag")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_task(task)

    def record(self, lag_ms: float) -> None:
        """Take one measurement (the watcher's; tests call it directly)."""
        now = self._clock()
        self._lag_ms_total += lag_ms
        self._samples += 1
        if lag_ms >= STALL_MS:
            self._stalls += 1
        recent = self._recent
        recent.append((now, lag_ms))
        while recent and recent[0][0] < now - self._window_s:
            recent.popleft()

    def stats(self) -> dict[str, Any]:
        horizon = self._clock() - self._window_s
        window = [lag for when, lag in self._recent if when >= horizon]
        return {
            "lag_ms": round(self._recent[-1][1] if self._recent else 0.0, 3),
            "lag_max_ms": round(max(window, default=0.0), 3),
            "stalls": self._stalls,
            "lag_ms_total": round(self._lag_ms_total, 3),
            "samples": self._samples,
        }

    async def _watch(self) -> None:
        interval = self.interval_s
        while True:
            asked = time.perf_counter()
            await asyncio.sleep(interval)
            late = time.perf_counter() - asked - interval
            self.record(max(0.0, late) * 1000.0)
