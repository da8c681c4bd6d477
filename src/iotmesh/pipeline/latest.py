"""Latest values per device and key, kept in memory after each commit.

The time-series store already keeps latest values durably (in the same transaction as
the points); this cache answers the frequent "current state" reads without touching the
store and is where live streams will hook in. It holds at most `max_devices` devices
(least recently used go first) and is filled from the store on a miss.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable

from iotmesh.core.types import TelemetryMessage, TsPoint


class LatestValues:
    """Bounded LRU map: device id → key → newest point."""

    def __init__(self, max_devices: int = 100_000) -> None:
        self._max = max_devices
        self._devices: collections.OrderedDict[str, dict[str, TsPoint]] = collections.OrderedDict()

    def get(self, device_id: str) -> dict[str, TsPoint] | None:
        """The cached latest values of a device, or None when not cached."""
        values = self._devices.get(device_id)
        if values is not None:
            self._devices.move_to_end(device_id)
        return values

    def fill(self, device_id: str, values: dict[str, TsPoint]) -> None:
        """Cache values read from the store (a cache miss)."""
        self._devices[device_id] = dict(values)
        self._trim()

    def invalidate(self, device_id: str) -> None:
        """Forget a device (its telemetry or the device was deleted)."""
        self._devices.pop(device_id, None)

    def update(self, messages: Iterable[TelemetryMessage]) -> None:
        """Apply committed messages; only devices already cached are updated."""
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
