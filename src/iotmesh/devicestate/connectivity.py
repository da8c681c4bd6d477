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

With a `mirror` (Redis, `storage.redis.connectivity`), several processes show one
truth: what changed is pushed every `mirror_interval_s` (one batch, the hot path only
marks the device), with this process's open sessions per device under its own
expiring key, so a dead process's sessions vanish. `read` (the API's) merges the
mirror's view (newest times, sessions of every live process) with this process's.

Error handling: a failed save is logged and retried at the next interval; a failed
push is retried with everything (the mirror may have lost this process's sessions);
a failed `read` of the mirror answers from this process alone.
Resource handling: `start` loads and starts the save (and push) tasks; `stop` saves
(and pushes) one last time.
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


class ConnectivityMirror(Protocol):
    """Connectivity shared by several processes (storage.redis.connectivity is one).

    Error handling: every method raises an `IotmeshError` when the mirror is down."""

    async def push(self, records: Sequence[tuple[DeviceActivity, int]], full: bool) -> bool:
        """Merge (newest wins) records and set this process's open sessions of each
        device (the int); `full`: these are all devices with sessions here (others
        have none). Returns True when the mirror had lost this process's sessions
        (the next push should be full)."""
        ...

    async def fetch(self, device_id: str) -> tuple[DeviceActivity | None, int, int]:
        """The merged record of a device, the sessions of every live process, and
        those of this process as last pushed."""
        ...

    async def forget(self, device_id: str) -> None: ...


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
        mirror: ConnectivityMirror | None = None,
        mirror_interval_s: float = 1.0,
    ) -> None:
        self._timeout_ms = int(inactivity_timeout_s * 1000)
        self._clock = clock
        self._devices: dict[str, _Record] = {}
        self._store = store
        self._save_interval_s = save_interval_s
        self._dirty: set[str] = set()  # devices changed since the last save
        self._saver: asyncio.Task[None] | None = None
        self._mirror = mirror
        self._mirror_interval_s = mirror_interval_s
        self._unpushed: set[str] | None = set() if mirror is not None else None
        self._push_all = True  # the first push says which sessions this process has
        self._pusher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Load what was saved (with a store) and start saving changes."""
        if self._mirror is not None:
            self._pusher = asyncio.create_task(self._push_loop(), name="connectivity.push")
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
        if self._pusher is not None:
            self._pusher.cancel()
            await asyncio.gather(self._pusher, return_exceptions=True)
            self._pusher = None
            self._push_all = True  # sessions closed by now: ours are dropped
            await self.push()
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

    async def push(self) -> None:
        """Push the devices that changed since the last push to the mirror."""
        if self._mirror is None or self._unpushed is None:
            return
        full = self._push_all
        changed, self._unpushed = self._unpushed, set()
        if full:
            changed |= {d for d, r in self._devices.items() if r.sessions.total() > 0}
        records = [
            (
                DeviceActivity(
                    device_id, r.transport, r.last_activity, r.last_connect, r.last_disconnect
                ),
                r.sessions.total(),
            )
            for device_id in changed
            if (r := self._devices.get(device_id)) is not None
        ]
        try:
            self._push_all = await self._mirror.push(records, full)
        except IotmeshError as exc:
            log.debug("pushing the connectivity of %d devices failed: %s", len(records), exc)
            self._unpushed |= changed
            self._push_all = True

    async def _push_loop(self) -> None:
        while True:
            await asyncio.sleep(self._mirror_interval_s)
            await self.push()  # also when nothing changed: it keeps our sessions alive

    async def read(self, device_id: str) -> Connectivity:
        """The device's connectivity as every process sees it (with a mirror), else
        as `state`."""
        local = self.state(device_id)
        if self._mirror is None:
            return local
        try:
            shared, total, ours = await self._mirror.fetch(device_id)
        except IotmeshError:
            return local
        if shared is None:
            return local
        record = self._devices.get(device_id)
        sessions = max(0, total - ours) + (record.sessions.total() if record else 0)
        activity = max(shared.last_activity_ts, local.last_activity_ts)
        newer = local.last_activity_ts >= shared.last_activity_ts and local.transport
        recent = self._clock() - activity < self._timeout_ms
        return Connectivity(
            online=sessions > 0 or (activity > 0 and recent),
            transport=local.transport if newer else shared.transport,
            last_activity_ts=activity,
            last_connect_ts=max(shared.last_connect_ts, local.last_connect_ts),
            last_disconnect_ts=max(shared.last_disconnect_ts, local.last_disconnect_ts),
            sessions=sessions,
        )

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
        if self._unpushed is not None:
            self._unpushed.add(device_id)

    def opened(self, device_id: str, transport: str) -> None:
        """A live session of the device over `transport` began."""
        record = self._record(device_id)
        record.last_connect = record.last_activity = self._clock()
        record.transport = transport
        record.sessions[transport] += 1
        self._dirty.add(device_id)
        if self._unpushed is not None:
            self._unpushed.add(device_id)

    def closed(self, device_id: str, transport: str) -> None:
        """A live session of the device over `transport` ended."""
        record = self._devices.get(device_id)
        if record is None or record.sessions[transport] <= 0:
            return
        record.sessions[transport] -= 1
        record.last_disconnect = self._clock()
        self._dirty.add(device_id)
        if self._unpushed is not None:
            self._unpushed.add(device_id)

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
        """Drop what is known of a deleted device (the mirror's copy: `forget_shared`)."""
        self._devices.pop(device_id, None)
        self._dirty.discard(device_id)
        if self._unpushed is not None:
            self._unpushed.discard(device_id)

    async def forget_shared(self, device_id: str) -> None:
        """Drop a deleted device here and in the mirror (best effort)."""
        self.forget(device_id)
        if self._mirror is not None:
            try:
                await self._mirror.forget(device_id)
            except IotmeshError as exc:
                log.warning("forgetting device %s in the mirror failed: %s", device_id, exc)

    def stats(self) -> dict[str, int]:
        now = self._clock()
        online = sum(
            1
            for r in self._devices.values()
            if sum(r.sessions.values()) > 0 or now - r.last_activity < self._timeout_ms
        )
        return {"devices_seen": len(self._devices), "online": online}
