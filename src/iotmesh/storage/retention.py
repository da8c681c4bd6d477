"""The retention job: every `storage.retention.interval_s`, expire what the settings say.

It turns `RetentionSettings` (seconds; TTLs per key and per device *type*) into a
`RetentionPolicy` (ms; TTLs per key and per device *id*, as a time-series store knows
devices only by id) and hands it to the store's `apply_retention`. The store does the
rest its own way: SQLite rolls up and deletes in its writer process, between writes;
InfluxDB runs `DELETE` statements.

Under leader election (`iotmesh serve`, `cluster/singleton.py`) the job runs on one
instance at a time and is given each term's fencing token (`use_token`). A pass then
first writes the token to the engine's fence (`fence`, e.g. `Fence.write`), which
refuses it once a newer leader has run a pass, and carries it in the policy, so a store
that can check it in its own transactions does (PostgreSQL).

Error handling: a failed pass is logged and tried again at the next interval; nothing
is lost by waiting (expired data just stays a little longer). A refused token skips
the pass the same way (a newer leader does the work).

Resource handling: one task, started by `start` and cancelled by `stop`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection

import msgspec

from iotmesh.core.clock import now_ms
from iotmesh.core.lifecycle import Service, cancel_task
from iotmesh.core.settings import RetentionSettings
from iotmesh.storage.rollup import RetentionPolicy
from iotmesh.storage.timeseries import TimeSeriesStore

log = logging.getLogger(__name__)

# Device ids of the given types, by type (the registry's listing).
DevicesOfTypes = Callable[[Collection[str]], Awaitable[dict[str, list[str]]]]

# Checks a fencing token before a pass: raises when a newer leader's token was seen.
FenceCheck = Callable[[int], Awaitable[None]]


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
        fence: FenceCheck | None = None,
    ) -> None:
        """`fence`: checked with the term's token before every pass (see `use_token`)."""
        self._store = store
        self._settings = settings
        self._devices_of_types = devices_of_types
        self._fence = fence
        self._task: asyncio.Task[None] | None = None
        self.fencing_token: int | None = None
        self.passes = 0

    def use_token(self, token: int) -> None:
        """This instance leads a new term: every pass from now on carries `token`."""
        self.fencing_token = token

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
        await cancel_task(task)

    async def run_once(self) -> None:
        """One pass now."""
        token = self.fencing_token
        if token is not None and self._fence is not None:
            await self._fence(token)
        policy = await build_policy(self._settings, self._devices_of_types, now_ms())
        if token is not None:
            policy = msgspec.structs.replace(policy, fencing_token=token)
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
