"""Latest values per device and key: a cache in front of the time-series store.

The time-series store already keeps latest values durably (in the same transaction as
the points); a `LatestCache` answers the frequent "current state" reads without
touching the store and is where live streams will hook in. Two implementations pass
the same contract (`tests/contract/test_latest.py`):

- `LatestValues` (here): this process's memory, a bounded LRU of devices, the default
  of `iotmesh run`.
- `storage.redis.latest.RedisLatestValues`: a hash per device in Redis, shared by
  several pipeline and API processes (`storage.latest = "redis"`).

The contract: `get` answers None for a device that is not cached (the caller reads the
store and `fill`s); once filled, `update` applies committed messages, the newest
timestamp of each key winning (an equal one replaces), whatever order they come in;
`invalidate` forgets a device. Updates of a device that is not cached do not make it
cached. The methods are async, for Redis; the memory one never waits.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable
from typing import Protocol

from iotmesh.core.types import TelemetryMessage, TsPoint


class LatestCache(Protocol):
    """Latest values per device and key (see the module docstring for the contract).

    Error handling: a cache never fails its caller. An implementation that cannot
    reach its server answers `get` with None (so the store is read) and skips the
    write, counting it.
    """

    async def get(self, device_id: str) -> dict[str, TsPoint] | None:
        """The cached latest values of a device, or None when not cached."""
        ...

    async def fill(self, device_id: str, values: dict[str, TsPoint]) -> None:
        """Cache values read from the store (after a miss)."""
        ...

    async def invalidate(self, device_id: str) -> None:
        """Forget a device (its telemetry or the device was deleted)."""
        ...

    async def update(self, messages: Iterable[TelemetryMessage]) -> None:
        """Apply committed messages (one call per committed batch)."""
        ...


class LatestValues:
    """`LatestCache` in memory: bounded LRU map device id → key → newest point."""

    def __init__(self, max_devices: int = 100_000) -> None:
        self._max = max_devices
        self._devices: collections.OrderedDict[str, dict[str, TsPoint]] = collections.OrderedDict()

    async def get(self, device_id: str) -> dict[str, TsPoint] | None:
        values = self._devices.get(device_id)
        if values is not None:
            self._devices.move_to_end(device_id)
        return values

    async def fill(self, device_id: str, values: dict[str, TsPoint]) -> None:
        self._devices[device_id] = dict(values)
        self._trim()

    async def invalidate(self, device_id: str) -> None:
        self._devices.pop(device_id, None)

    async def update(self, messages: Iterable[TelemetryMessage]) -> None:
        """Only devices already cached are updated."""
        for message in messages:
            current = self._devices.get(message.device_id)
            if current is None:
                continue
            for record in message.records:
                for key, value in record.values.items():
                    old = current.get(key)
                    if old is None or record.ts >= old.ts:
                        current[key] = TsPoint(record.ts, value)

    def _trim(self) -> None:
        while len(self._devices) > self._max:
            self._devices.popitem(last=False)
