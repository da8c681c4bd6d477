"""The attribute cache in the local Redis: reads come from it, a save or delete in any
process invalidates it for all, a fill that raced with a change is refused, and a
Redis that is down is bypassed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from iotmesh.core.types import AttributeScope, Device
from iotmesh.devicestate import AttributeService
from iotmesh.storage.redis import RedisAttributeCache
from iotmesh.storage.sqlite.state import SqliteStateStore
from tests.redis_hot import HotFactory, RedisOutage

SHARED, CLIENT = AttributeScope.SHARED, AttributeScope.CLIENT
DEVICE = "00000000-0000-4000-8000-000000000001"


class Processes:
    def __init__(self, path: Path, redis_hot: HotFactory) -> None:
        self.path = path
        self.redis_hot = redis_hot
        self.stores: list[SqliteStateStore] = []

    async def store(self) -> SqliteStateStore:
        state = SqliteStateStore(self.path, synchronous="OFF")
        await state.open()
        if not self.stores:
            await state.create_device(Device(DEVICE, "d", "default", None, 1, "token"))
        self.stores.append(state)
        return state

    async def start(self, **hot: object) -> AttributeService:
        return AttributeService(
            await self.store(), RedisAttributeCache(await self.redis_hot(**hot))
        )


@pytest.fixture
async def processes(tmp_path: Path, redis_hot: HotFactory) -> AsyncIterator[Processes]:
    p = Processes(tmp_path / "state.db", redis_hot)
    try:
        yield p
    finally:
        for state in p.stores:
            await state.close()


async def test_reads_come_from_the_cache(processes: Processes) -> None:
    service = await processes.start()
    behind = await processes.store()  # writes the cache does not hear of
    await service.save(DEVICE, SHARED, {"mode": "eco", "target": 21})
    assert await service.values(DEVICE, SHARED) == {"mode": "eco", "target": 21}  # filled
    await behind.save_attributes(DEVICE, SHARED, {"mode": "sneaky"}, 1)
    assert await service.values(DEVICE, SHARED) == {"mode": "eco", "target": 21}  # cached
    assert await service.values(DEVICE, SHARED, ["target", "nope"]) == {"target": 21}
    attrs = await service.get(DEVICE, SHARED)
    assert [(a.key, a.version) for a in attrs] == [("mode", 1), ("target", 1)]
    assert await service.values(DEVICE, CLIENT) == {}  # scopes are cached apart


async def test_a_change_in_one_process_is_seen_by_another(processes: Processes) -> None:
    writer, reader = await processes.start(), await processes.start()
    await writer.save(DEVICE, CLIENT, {"fw": "1.0", "ip": "10.0.0.2"})
    assert await reader.values(DEVICE, CLIENT) == {"fw": "1.0", "ip": "10.0.0.2"}
    await writer.save(DEVICE, CLIENT, {"fw": "1.1"})
    assert await reader.values(DEVICE, CLIENT) == {"fw": "1.1", "ip": "10.0.0.2"}
    await writer.delete(DEVICE, CLIENT, ["ip"])
    assert await reader.values(DEVICE, CLIENT) == {"fw": "1.1"}
    twin = await reader.twin(DEVICE)
    assert twin.reported["fw"].version == 2


async def test_a_fill_that_raced_with_a_change_is_refused(
    processes: Processes, redis_hot: HotFactory
) -> None:
    cache = RedisAttributeCache(await redis_hot())
    state = await processes.store()
    await state.save_attributes(DEVICE, SHARED, {"v": 1}, 1)
    cached, token = await cache.read(DEVICE, SHARED)
    assert cached is None
    old = await state.get_attributes(DEVICE, SHARED, None)  # the reader read the store...
    await state.save_attributes(DEVICE, SHARED, {"v": 2}, 2)  # ...a writer committed
    await cache.invalidate(DEVICE, SHARED)  # and invalidated
    await cache.fill(DEVICE, SHARED, old, token)  # the reader's late fill
    assert (await cache.read(DEVICE, SHARED))[0] is None


async def test_redis_down_reads_and_writes_the_store(processes: Processes) -> None:
    outage = RedisOutage()
    await outage.start()
    service = await processes.start(url=outage.url, timeout_s=0.3)
    other = await processes.start()
    await service.save(DEVICE, SHARED, {"v": 1})
    assert await other.values(DEVICE, SHARED) == {"v": 1}  # cached in Redis
    await outage.cut()
    await service.save(DEVICE, SHARED, {"v": 2})  # invalidation fails: remembered
    assert await service.values(DEVICE, SHARED) == {"v": 2}  # from the store
    await outage.start()
    assert await service.values(DEVICE, SHARED) == {"v": 2}  # invalidated now
    assert await other.values(DEVICE, SHARED) == {"v": 2}
    await outage.cut()
