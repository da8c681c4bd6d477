"""Connectivity: is a device online, over which transport, and when was it last heard.

Every transport reports what it sees of a device, whatever the protocol:
- `opened` / `closed` bracket a live session: an MQTT connection, a CoAP observation,
  an HTTP long-poll. While one is open the device is online.
- `activity` marks any upload or request (an HTTP POST, a CoAP request, an MQTT
  PUBLISH). Without a live session a device stays online for `inactivity_timeout_s`
  after its last activity: CoAP and HTTP devices have no connection to watch.

The calls are synchronous and cheap (a dict update), so transports make them on their
hot paths. Readers get a `Connectivity` snapshot computed at the time of the read.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

import msgspec

from iotmesh.core.clock import now_ms
from iotmesh.core.lifecycle import Service


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
        self, inactivity_timeout_s: float = 600.0, clock: Callable[[], int] = now_ms
    ) -> None:
        self._timeout_ms = int(inactivity_timeout_s * 1000)
        self._clock = clock
        self._devices: dict[str, _Record] = {}

    async def start(self) -> None:
        """Nothing to start: the state lives in memory."""

    async def stop(self) -> None:
        """Nothing to release."""

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

    def opened(self, device_id: str, transport: str) -> None:
        """A live session of the device over `transport` began."""
        record = self._record(device_id)
        record.last_connect = record.last_activity = self._clock()
        record.transport = transport
        record.sessions[transport] += 1

    def closed(self, device_id: str, transport: str) -> None:
        """A live session of the device over `transport` ended."""
        record = self._devices.get(device_id)
        if record is None or record.sessions[transport] <= 0:
            return
        record.sessions[transport] -= 1
        record.last_disconnect = self._clock()

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

    def stats(self) -> dict[str, int]:
        now = self._clock()
        online = sum(
            1
            for r in self._devices.values()
            if sum(r.sessions.values()) > 0 or now - r.last_activity < self._timeout_ms
        )
        return {"devices_seen": len(self._devices), "online": online}
