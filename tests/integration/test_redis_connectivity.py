"""Connectivity mirrored to the local Redis: several processes' ConnectivityServices
show one truth; a dead process's sessions vanish; Redis down or a lost key are
survived."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from iotmesh.core.types import DeviceActivity
from iotmesh.devicestate.connectivity import Connectivity, ConnectivityService
from iotmesh.storage.redis import HotState, RedisConnectivityMirror
from tests.redis_hot import HotFactory, RedisOutage

FLUSH_S = 0.05


class Processes:
    def __init__(self, redis_hot: HotFactory) -> None:
        self.redis_hot = redis_hot
        self.started: list[ConnectivityService] = []

    async def start(self, **hot: object) -> ConnectivityService:
        mirror = RedisConnectivityMirror(await self.redis_hot(connectivity_flush_s=FLUSH_S, **hot))
        service = ConnectivityService(60.0, mirror=mirror, mirror_interval_s=FLUSH_S)
        await service.start()
        self.started.append(service)
        return service


@pytest.fixture
async def processes(redis_hot: HotFactory) -> AsyncIterator[Processes]:
    p = Processes(redis_hot)
    try:
        yield p
    finally:
        for service in p.started:
            await service.stop()


async def _until(
    service: ConnectivityService, device_id: str, check: Callable[[Connectivity], bool]
) -> Connectivity:
    async with asyncio.timeout(10):
        while not check(state := await service.read(device_id)):  # noqa: ASYNC110 (polls Redis)
            await asyncio.sleep(0.02)
    return state


async def test_a_session_in_one_process_is_seen_by_another(processes: Processes) -> None:
    mqtt, http = await processes.start(), await processes.start()
    assert await http.read("d") == Connectivity(False, None, 0, 0, 0, 0)
    mqtt.opened("d", "mqtt")
    state = await _until(http, "d", lambda s: s.online)
    assert (state.transport, state.sessions) == ("mqtt", 1)
    assert state.last_connect_ts > 0
    http.opened("d", "http")  # a long-poll here as well
    assert (await http.read("d")).sessions == 2
    mqtt.closed("d", "mqtt")
    state = await _until(http, "d", lambda s: s.sessions == 1)
    assert state.last_disconnect_ts > 0
    http.closed("d", "http")
    state = await _until(mqtt, "d", lambda s: s.sessions == 0)
    assert state.online  # recent activity still counts


async def test_the_newest_activity_names_the_transport(processes: Processes) -> None:
    a, b = await processes.start(), await processes.start()
    a.activity("d", "coap")
    await _until(b, "d", lambda s: s.transport == "coap")
    await asyncio.sleep(0.01)  # a later millisecond
    b.activity("d", "http")
    await _until(a, "d", lambda s: s.transport == "http")


async def test_the_sessions_of_a_dead_process_vanish(
    processes: Processes, redis_hot: HotFactory
) -> None:
    reader = await processes.start()
    hot: HotState = await redis_hot(connectivity_flush_s=0.1)  # expiry: the 3 s minimum
    dead = RedisConnectivityMirror(hot)
    await dead.push([(DeviceActivity("d", "mqtt", 1, 1, 0), 1)], full=True)  # then it dies
    assert (await reader.read("d")).sessions == 1
    state = await _until(reader, "d", lambda s: s.sessions == 0)
    assert state.last_connect_ts == 1


async def test_a_lost_sessions_key_is_pushed_again_in_full(
    processes: Processes, redis_hot: HotFactory
) -> None:
    a, b = await processes.start(), await processes.start()
    a.opened("d", "mqtt")
    await _until(b, "d", lambda s: s.sessions == 1)
    hot = await redis_hot()
    await hot.redis.delete(
        *[k async for k in hot.redis.scan_iter(hot.key("conn", "sessions", "*"))]
    )
    assert (await b.read("d")).sessions == 0  # as after a Redis restart
    await _until(b, "d", lambda s: s.sessions == 1)


async def test_redis_down_reads_this_process_and_catches_up(processes: Processes) -> None:
    outage = RedisOutage()
    await outage.start()
    a = await processes.start(url=outage.url, timeout_s=0.3)
    b = await processes.start()
    await outage.cut()
    a.opened("d", "mqtt")  # the hot path never waits for Redis
    state = await a.read("d")
    assert (state.online, state.sessions) == (True, 1)  # this process's view
    await asyncio.sleep(FLUSH_S * 4)  # a few pushes fail
    assert (await b.read("d")).sessions == 0
    await outage.start()
    await _until(b, "d", lambda s: s.sessions == 1)
    await outage.cut()
