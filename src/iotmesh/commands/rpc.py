"""Server-side RPC: a user asks a device to run a method and waits for its reply.

A transport holding a live session that can receive RPC (an MQTT client subscribed to
`v1/devices/me/rpc/request/+`, a gateway subscribed to `v1/gateway/rpc`) attaches an
`RpcSink` for its device. `call` waits (within the request's timeout) for a sink,
sends the request through it and, unless the call is one-way, waits for the device's
reply, which the transport hands back with `reply`. A device behind a gateway is
reached through its gateway's sink.

Request ids are small integers, unique per device while this process runs, as the
ThingsBoard device API expects (`.../rpc/request/{id}`).

Error handling: no sink in time, or no reply in time → `DeviceTimeout` (HTTP 504).
A reply to an unknown or expired id is ignored (and counted).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from iotmesh.core.errors import DeviceGone, DeviceTimeout, PayloadError
from iotmesh.core.lifecycle import Service
from iotmesh.core.types import Device

log = logging.getLogger(__name__)

MAX_TIMEOUT_MS = 10 * 60 * 1000


def _gateway_key(gateway_id: str) -> str:
    return f"gateway:{gateway_id}"


class RpcRequest(msgspec.Struct, frozen=True):
    """One server-side RPC request as a device receives it."""

    id: int
    method: str
    params: Any
    oneway: bool = False


RpcSink = Callable[[Device, RpcRequest], Awaitable[None]]
"""A live session's way to send a request to a device (or to a device behind a
gateway); it raises if the session cannot take it."""


class RpcService(Service):
    """Routes RPC requests to devices' live sessions and replies back to callers."""

    name = "rpc"

    def __init__(self) -> None:
        self._sinks: dict[str, list[RpcSink]] = collections.defaultdict(list)
        self._sink_added: dict[str, asyncio.Event] = {}
        self._pending: dict[tuple[str, int], asyncio.Future[Any]] = {}
        self._ids: dict[str, itertools.count[int]] = {}
        self.stray_replies = 0

    async def start(self) -> None:
        """Nothing to start."""

    async def stop(self) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(DeviceTimeout("the platform is shutting down"))
        self._pending.clear()

    def attach(self, device_id: str, sink: RpcSink) -> Callable[[], None]:
        """Register a session's sink; returns the function that removes it."""
        self._sinks[device_id].append(sink)
        event = self._sink_added.pop(device_id, None)
        if event is not None:
            event.set()

        def detach() -> None:
            sinks = self._sinks.get(device_id)
            if sinks and sink in sinks:
                sinks.remove(sink)
                if not sinks:
                    del self._sinks[device_id]

        return detach

    def attach_gateway(self, gateway_id: str, sink: RpcSink) -> Callable[[], None]:
        """Register a gateway session's sink for the devices behind the gateway."""
        return self.attach(_gateway_key(gateway_id), sink)

    @staticmethod
    def _owners(device: Device) -> list[str]:
        owners = [device.id]
        if device.gateway_id:
            owners.append(_gateway_key(device.gateway_id))
        return owners

    def _sink_for(self, device: Device) -> RpcSink | None:
        for owner in self._owners(device):
            if self._sinks.get(owner):
                return self._sinks[owner][-1]  # the newest session of the device
        return None

    async def _wait_for_sink(self, device: Device) -> RpcSink:
        while (sink := self._sink_for(device)) is None:
            owners = self._owners(device)
            events = [self._sink_added.setdefault(o, asyncio.Event()) for o in owners]
            waits = [asyncio.create_task(e.wait(), name=f"rpc.wait-{device.id}") for e in events]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in waits:
                    task.cancel()
        return sink

    async def call(
        self, device: Device, method: str, params: Any, *, timeout_ms: int, oneway: bool = False
    ) -> Any:
        """Send an RPC request to `device`; return its reply (None when one-way).

        Raises:
            PayloadError: empty method or a timeout out of range.
            DeviceTimeout: the device was not reachable or did not reply in time.
        """
        if not method:
            raise PayloadError("method must not be empty")
        if not 0 < timeout_ms <= MAX_TIMEOUT_MS:
            raise PayloadError(f"timeout_ms must be between 1 and {MAX_TIMEOUT_MS}")
        request_id = next(self._ids.setdefault(device.id, itertools.count(1)))
        request = RpcRequest(request_id, method, params, oneway)
        key = (device.id, request_id)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if not oneway:
            self._pending[key] = future
        try:
            async with asyncio.timeout(timeout_ms / 1000):
                while True:
                    sink = await self._wait_for_sink(device)
                    try:
                        await sink(device, request)
                        break
                    except DeviceGone:  # that session just lost interest: try another
                        await asyncio.sleep(0.05)
                if oneway:
                    return None
                return await future
        except TimeoutError:
            raise DeviceTimeout(
                f"device {device.name} did not answer {method!r} within {timeout_ms} ms"
            ) from None
        finally:
            self._pending.pop(key, None)

    def reply(self, device_id: str, request_id: int, payload: Any) -> bool:
        """Hand a device's reply to the waiting caller; False if nobody waits for it."""
        future = self._pending.get((device_id, request_id))
        if future is None or future.done():
            self.stray_replies += 1
            log.info("reply of device %s to unknown RPC %s ignored", device_id, request_id)
            return False
        future.set_result(payload)
        return True
