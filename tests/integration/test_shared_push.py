"""Shared-attribute pushes across processes: AttributeService instances ("processes")
over one SQLite state store file, joined by the live broadcast of a real bus engine
(NATS core subjects, Redis pub/sub). A change committed by one reaches the listeners
of the device in every other, once; the originating process calls its own listeners
once (it skips its own broadcast); what is not SHARED, or deleted nothing, is not
pushed; and the in-process bus has no broadcast at all."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from iotmesh.bus import make_bus
from iotmesh.bus.interface import Bus
from iotmesh.core.settings import BusSettings
from iotmesh.core.types import AttributeScope, Device
from iotmesh.devicestate import AttributeService
from iotmesh.storage.sqlite.state import SqliteStateStore

SHARED, SERVER = AttributeScope.SHARED, AttributeScope.SERVER
DEVICE = "00000000-0000-4000-8000-000000000001"
OTHER = "00000000-0000-4000-8000-000000000002"
URLS = {"nats_url": "nats://127.0.0.1:4222", "redis_url": "redis://127.0.0.1:6379/15"}


class Pushes:
    """A session's listener: records each push, wakes a waiter."""

    def __init__(self) -> None:
        self.got: list[tuple[dict[str, Any], list[str]]] = []
        self.changed = asyncio.Event()

    async def __call__(self, changed: dict[str, Any], deleted: list[str]) -> None:
        self.got.append((changed, deleted))
        self.changed.set()

    async def wait(self, count: int) -> None:
        async with asyncio.timeout(10):
            while len(self.got) < count:
                self.changed.clear()
                await self.changed.wait()


class Processes:
    def __init__(self, engine: str, path: Path) -> None:
        self.settings = BusSettings(
            backend=engine,  # type: ignore[arg-type]
            namespace=f"t{uuid.uuid4().hex[:10]}",
            **URLS,
        )
        self.path = path
        self.stores: list[SqliteStateStore] = []
        self.buses: list[Bus] = []
        self.services: list[AttributeService] = []

    async def start(self) -> AttributeService:
        state = SqliteStateStore(self.path, synchronous="OFF")
        await state.open()
        if not self.stores:
            for device_id in (DEVICE, OTHER):
                await state.create_device(
                    Device(device_id, device_id, "default", None, 1, device_id)
                )
        self.stores.append(state)
        bus = make_bus(self.settings)
        await bus.start()
        self.buses.append(bus)
        service = AttributeService(state, None, bus.broadcast())
        await service.start()
        self.services.append(service)
        return service

    async def close(self) -> None:
        for service in self.services:
            await service.stop()
        for bus in self.buses:
            await bus.stop()
        for state in self.stores:
            await state.close()


@pytest.fixture(params=["nats", "redis"])
async def processes(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Processes]:
    p = Processes(request.param, tmp_path / "state.db")
    try:
        yield p
    finally:
        await p.close()


async def test_a_change_reaches_the_sessions_of_other_processes_once(
    processes: Processes,
) -> None:
    http, mqtt, coap = [await processes.start() for _ in range(3)]
    here, there, elsewhere, other_device = Pushes(), Pushes(), Pushes(), Pushes()
    http.listen_shared(DEVICE, here)
    mqtt.listen_shared(DEVICE, there)
    coap.listen_shared(DEVICE, elsewhere)
    coap.listen_shared(OTHER, other_device)

    await http.save(DEVICE, SHARED, {"mode": "eco"})
    await http.save(DEVICE, SERVER, {"secret": 1})  # never pushed
    await http.save(DEVICE, SHARED, {"target": 21})
    assert await http.delete(DEVICE, SHARED, ["nope"]) == 0  # nothing deleted, no push
    assert await http.delete(DEVICE, SHARED, ["mode"]) == 1
    expected = [({"mode": "eco"}, []), ({"target": 21}, []), ({}, ["mode"])]
    for pushes in (there, elsewhere):
        await pushes.wait(len(expected))
    await http.save(OTHER, SHARED, {"marker": True})  # after everything above, in order
    await other_device.wait(1)
    for pushes in (here, there, elsewhere):
        assert pushes.got == expected  # in order, once each (the origin skips its own)
    assert other_device.got == [({"marker": True}, [])]


async def test_a_closed_listener_gets_nothing_more(processes: Processes) -> None:
    http, mqtt = await processes.start(), await processes.start()
    pushes = Pushes()
    remove = mqtt.listen_shared(DEVICE, pushes)
    await http.save(DEVICE, SHARED, {"n": 1})
    await pushes.wait(1)
    remove()
    marker = Pushes()
    mqtt.listen_shared(OTHER, marker)
    await http.save(DEVICE, SHARED, {"n": 2})
    await http.save(OTHER, SHARED, {"n": 3})
    await marker.wait(1)  # broadcasts keep their order: the second change has come
    assert pushes.got == [({"n": 1}, [])]


async def test_the_in_process_bus_has_no_broadcast() -> None:
    bus = make_bus(BusSettings())
    await bus.start()
    try:
        assert bus.broadcast() is None
    finally:
        await bus.stop()
