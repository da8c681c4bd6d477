"""The retention job: every `storage.retention.interval_s`, expire what the settings say.

It turns `RetentionSettings` (seconds; TTLs per key and per device *type*) into a
`RetentionPolicy` (ms; TTLs per key and per device *id*, as a time-series store knows
devices only by id) and hands it to the store's `apply_retention`. The store does the
rest its own way: SQLite rolls up and deletes in its writer process, between writes;
InfluxDB runs `DELETE` statements.

Error handling: a failed pass is logged and tried again at the next interval; nothing
is lost by waiting (expired data just stays a little longer).

Resource handling: one task, started by `start` and cancelled by `stop`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Collection

from iotmesh.core.clock import now_ms
from iotmesh.core.lifecycle import Service
from iotmesh.core.settings import RetentionSettings
from iotmesh.storage.rollup import RetentionPolicy
from iotmesh.storage.timeseries import TimeSeriesStore

log = logging.getLogger(__name__)

# Device ids of the given types, by type (the registry's listing).
DevicesOfTypes = Callable[[Collection[str]], Awaitable[dict[str, list[str]]]]


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


async def build_policy(
    settings: RetentionSettings, devices_of_types: DevicesOfTypes, now: int
) -> RetentionPolicy:
    """The policy of this moment: device-type TTLs resolved to device ids."""
    entities: dict[str, int] = {}
    if settings.device_types:
        by_type = await devices_of_types(settings.device_types.keys())
        for device_type, ids in by_type.items():
            ttl = _ms(settings.device_types[device_type])
            for device_id in ids:
                entities[device_id] = ttl
    return RetentionPolicy(
        now_ms=now,
        raw_ttl_ms=_ms(settings.raw_ttl_s),
        keys={key: _ms(ttl) for key, ttl in settings.keys.items()},
        entities=entities,
        levels={level.interval_ms: _ms(level.ttl_s) for level in settings.rollups},
    )


class RetentionJob(Service):
    """Applies the retention settings to a time-series store periodically."""

    name = "retention"

    def __init__(
        self,
        store: TimeSeriesStore,
        settings: RetentionSettings,
        devices_of_types: DevicesOfTypes,
    ) -> None:
        self._store = store
        self._settings = settings
        self._devices_of_types = devices_of_types
        self._task: asyncio.Task[None] | None = None
        self.passes = 0

    def _needed(self) -> bool:
        s = self._settings
        return bool(
            s.raw_ttl_s or s.keys or s.device_types or any(level.ttl_s for level in s.rollups)
        )

    async def start(self) -> None:
        if self._needed():
            self._task = asyncio.create_task(self._run(), name="retention")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def run_once(self) -> None:
        """One pass now."""
        policy = await build_policy(self._settings, self._devices_of_types, now_ms())
        await self._store.apply_retention(policy)
        self.passes += 1

    async def _run(self) -> None:
        while True:
            try:
                await self.run_once()
            except Exception:
                log.exception(
                    "retention pass failed; trying again in %ss", self._settings.interval_s
                )
            await asyncio.sleep(self._settings.interval_s)

    def stats(self) -> dict[str, int]:
        return {"passes": self.passes}
