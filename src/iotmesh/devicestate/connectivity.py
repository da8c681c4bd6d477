"""Connectivity: is a device online, over which transport, and when was it last heard.

Every transport reports what it sees of a device, whatever the protocol:
- `opened` / `closed` bracket a live session: an MQTT connection, a CoAP observation,
  an HTTP long-poll. While one is open the device is online.
- `activity` marks any upload or request (an HTTP POST, a CoAP request, an MQTT
  PUBLISH). Without a live session a device stays online for `inactivity_timeout_s`
  after its last activity: CoAP and HTTP devices have no connection to watch.

The calls are synchronous and cheap (a dict update), so transports make them on their
hot paths. Readers get a `Connectivity` snapshot computed at the time of the read.

With a `store` (the state store), what is known of each device (transport, last
activity, connect and disconnect times; not its sessions) is saved every
`save_interval_s` and at stop, and loaded at start: after a restart a device is offline
(no session yet) but its last activity is still shown. A crash loses at most the last
interval's updates.

Error handling: a failed save is logged and retried at the next interval.
Resource handling: `start` loads and starts the save task; `stop` saves one last time.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable, Sequence
from typing import Protocol

import msgspec

from iotmesh.core.clock import now_ms
from iotmesh.core.errors import IotmeshError
from iotmesh.core.lifecycle import Service
from iotmesh.core.types import DeviceActivity

log = logging.getLogger(__name__)


class ActivityStore(Protocol):
    """Where connectivity is saved (the state store is one)."""

    async def load_activity(self) -> list[DeviceActivity]: ...

    async def save_activity(self, records: Sequence[DeviceActivity]) -> None: ...


class Connectivity(msgspec.Struct, frozen=True):
    """A device's connectivity as the API shows it (times in Unix ms; 0: never)."""

    online: bool
    transport: str | None
    last_activity_ts: int
    last_connect_ts: int
    last_disconnect_ts: int
    sessions: int


class _Record:
    __slots__ = ("last_activity", "last_connect", "last_disconnect", "sessions", "transport")

    def __init__(self) -> None:
        self.transport: str | None = None
        self.last_activity = 0
        self.last_connect = 0
        self.last_disconnect = 0
        self.sessions: collections.Counter[str] = collections.Counter()


class ConnectivityService(Service):
    """Tracks the connectivity of every device this process has seen."""

    name = "connectivity"

    def __init__(
        self,
        inactivity_timeout_s: float = 600.0,
        clock: Callable[[], int] = now_ms,
        *,
        store: ActivityStore | None = None,
        save_interval_s: float = 30.0,
    ) -> None:
        self._timeout_ms = int(inactivity_timeout_s * 1000)
        self._clock = clock
        self._devices: dict[str, _Record] = {}
        self._store = store
        self._save_interval_s = save_interval_s
        self._dirty: set[str] = set()  # devices changed since the last save
        self._saver: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Load what was saved (with a store) and start saving changes."""
        if self._store is None:
            return
        for saved in await self._store.load_activity():
            record = self._record(saved.device_id)
            record.transport = saved.transport
            record.last_activity = saved.last_activity_ts
            record.last_connect = saved.last_connect_ts
            record.last_disconnect = saved.last_disconnect_ts
        self._saver = asyncio.create_task(self._save_loop(), name="connectivity.save")

    async def stop(self) -> None:
        """Save what changed since the last save (with a store)."""
        if self._saver is None:
            return
        self._saver.cancel()
        await asyncio.gather(self._saver, return_exceptions=True)
        self._saver = None
        await self.save()

    async def save(self) -> None:
        """Write the devices that changed since the last save."""
        if self._store is None or not self._dirty:
            return
        dirty, self._dirty = self._dirty, set()
        records = [
            DeviceActivity(
                device_id,
                r.transport,
                r.last_activity,
                r.last_connect,
                r.last_disconnect,
            )
            for device_id in dirty
            if (r := self._devices.get(device_id)) is not None
        ]
        try:
            await self._store.save_activity(records)
        except IotmeshError as exc:
            log.warning("saving the connectivity of %d devices failed: %s", len(records), exc)
            self._dirty |= dirty  # again next time

    async def _save_loop(self) -> None:
        while True:
            await asyncio.sleep(self._save_interval_s)
            await self.save()

    def _record(self, device_id: str) -> _Record:
        record = self._devices.get(device_id)
        if record is None:
            record = self._devices[device_id] = _Record()
        return record

    def activity(self, device_id: str, transport: str) -> None:
        """The device sent something over `transport` just now."""
        record = self._record(device_id)
        record.last_activity = self._clock()
        record.transport = transport
        self._dirty.add(device_id)

    def opened(self, device_id: str, transport: str) -> None:
        """A live session of the device over `transport` began."""
        record = self._record(device_id)
        record.last_connect = record.last_activity = self._clock()
        record.transport = transport
        record.sessions[transport] += 1
        self._dirty.add(device_id)

    def closed(self, device_id: str, transport: str) -> None:
        """A live session of the device over `transport` ended."""
        record = self._devices.get(device_id)
        if record is None or record.sessions[transport] <= 0:
            return
        record.sessions[transport] -= 1
        record.last_disconnect = self._clock()
        self._dirty.add(device_id)

    def state(self, device_id: str) -> Connectivity:
        """The device's connectivity now; a device never seen is offline."""
        record = self._devices.get(device_id)
        if record is None:
            return Connectivity(False, None, 0, 0, 0, 0)
        sessions = sum(record.sessions.values())
        recent = self._clock() - record.last_activity < self._timeout_ms
        return Connectivity(
            online=sessions > 0 or (record.last_activity > 0 and recent),
            transport=record.transport,
            last_activity_ts=record.last_activity,
            last_connect_ts=record.last_connect,
            last_disconnect_ts=record.last_disconnect,
            sessions=sessions,
        )

    def forget(self, device_id: str) -> None:
        """Drop what is known of a deleted device."""
        self._devices.pop(device_id, None)
        self._dirty.discard(device_id)

    def stats(self) -> dict[str, int]:
        now = self._clock()
        online = sum(
            1
            for r in self._devices.values()
            if sum(r.sessions.values()) > 0 or now - r.last_activity < self._timeout_ms
        )
        return {"devices_seen": len(self._devices), "online": online}
