"""RpcHousekeeping over a real SQLite state store, with claims and completions on a real
Redis (the `redis_hot` fixture): the purge, and the sweep that ends overdue requests no
process holds, respecting claims, announcing ended calls, refusing a stale token."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

from iotmesh.commands import rpc_housekeeping
from iotmesh.commands.rpc import RpcService
from iotmesh.commands.rpc_housekeeping import RpcHousekeeping
from iotmesh.commands.wakeups import CLAIM_TTL_S
from iotmesh.core.errors import DeviceTimeout, IotmeshError
from iotmesh.core.settings import DeviceSettings
from iotmesh.core.types import Device, RpcStatus
from iotmesh.registry import DeviceRegistry
from iotmesh.storage.redis import RedisRpcNotifier
from iotmesh.storage.sqlite.state import SqliteStateStore
from tests.redis_hot import HotFactory

T0 = 1_700_000_000_000
DAY_MS = 86_400_000


class Clock:
    """A settable Unix-ms clock."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now


class Env:
    """A state store, a clock, and notifiers that share one Redis namespace."""

    def __init__(self, path: Path, redis_hot: HotFactory) -> None:
        self.clock = Clock()
        self.state = SqliteStateStore(path, synchronous="OFF")
        self.registry = DeviceRegistry(self.state)
        self.redis_hot = redis_hot
        self.services: list[RpcService] = []

    async def notifier(self) -> RedisRpcNotifier:
        return RedisRpcNotifier(await self.redis_hot(), CLAIM_TTL_S)

    async def job(self, *, claims: bool = True, **settings: float) -> RpcHousekeeping:
        notifier = await self.notifier() if claims else None
        devices = DeviceSettings(**settings)  # type: ignore[arg-type]
        return RpcHousekeeping(self.state, devices, notifier=notifier, clock=self.clock)

    async def rpc(self) -> RpcService:
        """An RPC service of a process without the device's sessions (it hands off)."""
        service = RpcService(
            self.state, DeviceSettings(), clock=self.clock, notifier=await self.notifier()
        )
        await service.start()
        self.services.append(service)
        return service

    async def status(self, device: Device, rpc_id: int) -> RpcStatus:
        record = await self.state.get_rpc(device.id, rpc_id)
        assert record is not None
        return record.status


@pytest.fixture
async def env(tmp_path: Path, redis_hot: HotFactory) -> AsyncIterator[Env]:
    e = Env(tmp_path / "state.db", redis_hot)
    await e.registry.start()
    try:
        yield e
    finally:
        for service in e.services:
            await service.stop()
        await e.registry.stop()


async def test_purge_deletes_old_finished_requests_once_per_interval(env: Env) -> None:
    device = await env.registry.create("d1")
    rpc = await env.rpc()
    job = await env.job(claims=False, rpc_retention_s=60, rpc_purge_interval_s=3600)
    with pytest.raises(DeviceTimeout):
        await rpc.call(device, "old", {}, timeout_ms=20)
    await rpc.submit(device, "open", {}, timeout_ms=100)
    await rpc.flushed()
    env.clock.now += 61_000  # past rpc_retention_s
    await job.run_once()
    assert [r.method for r in (await rpc.list(device.id, 0, 10)).data] == ["open"]
    with pytest.raises(DeviceTimeout):
        await rpc.call(device, "newer", {}, timeout_ms=20)
    await rpc.flushed()
    env.clock.now += 61_000  # old enough, but the next purge is an hour after the last
    await job.run_once()
    assert len((await rpc.list(device.id, 0, 10)).data) == 2
    env.clock.now += 3600_000
    await job.run_once()
    assert [r.method for r in (await rpc.list(device.id, 0, 10)).data] == ["open"]
    assert job.stats() == {
        "passes": 3,
        "purged": 2,
        "expired": 0,
        "timed_out": 0,
        "left_held": 0,
    }


async def test_the_sweep_ends_overdue_requests_nobody_holds(env: Env) -> None:
    device = await env.registry.create("d1")
    rpc = await env.rpc()
    job = await env.job()
    stale = await rpc.submit(device, "a", None, timeout_ms=1000, expiration_ts=T0 + 1000)
    fresh = await rpc.submit(device, "b", None, timeout_ms=1000, expiration_ts=T0 + 5000)
    assert await job.sweep() == []  # nothing due yet
    env.clock.now = T0 + 1000
    (ended,) = await job.sweep()
    assert (ended.id, ended.status, ended.finished_ts) == (stale.id, RpcStatus.EXPIRED, T0 + 1000)
    assert await env.status(device, fresh.id) is RpcStatus.QUEUED
    env.clock.now = T0 + 5000
    await job.run_once()
    assert await env.status(device, fresh.id) is RpcStatus.EXPIRED
    assert job.stats() == {
        "passes": 1,
        "purged": 0,
        "expired": 2,
        "timed_out": 0,
        "left_held": 0,
    }


async def test_a_sent_request_nobody_holds_times_out_after_its_reply_timeout(
    env: Env,
) -> None:
    device = await env.registry.create("d1")
    rpc = await env.rpc()
    job = await env.job()
    record = await rpc.submit(device, "m", None, timeout_ms=1000, expiration_ts=T0 + 500)
    # Delivered by a process that then died (its claim lapsed): waits for the reply.
    delivered = msgspec.structs.replace(record, status=RpcStatus.DELIVERED, sent_ts=T0 + 100)
    await env.state.update_rpcs([delivered])
    env.clock.now = T0 + 1099  # past its expiration, not past sent + timeout
    assert await job.sweep() == []
    env.clock.now = T0 + 1100
    (ended,) = await job.sweep()
    assert (ended.status, ended.sent_ts) == (RpcStatus.TIMEOUT, T0 + 100)


async def test_a_request_a_live_process_holds_is_left_to_it(env: Env) -> None:
    device = await env.registry.create("d1")
    rpc = await env.rpc()
    job = await env.job()
    record = await rpc.submit(device, "m", None, timeout_ms=1000, expiration_ts=T0 + 1000)
    holder = await env.notifier()  # another process's claim on the request
    assert await holder.claim(device.id, [record.id]) == {record.id}
    env.clock.now = T0 + 2000
    assert await job.sweep() == []
    assert await env.status(device, record.id) is RpcStatus.QUEUED
    assert job.stats()["left_held"] == 1
    await holder.release(device.id, [record.id])  # as its claim lapsing would
    assert [r.status for r in await job.sweep()] == [RpcStatus.EXPIRED]
    # The job released its own claim: the request's id is free for anyone again.
    assert await holder.claim(device.id, [record.id]) == {record.id}


async def test_a_caller_waiting_in_another_process_learns_of_the_sweep_at_once(
    env: Env,
) -> None:
    device = await env.registry.create("d1")
    http = await env.rpc()
    job = await env.job()
    # A call handed off (no session anywhere) waits up to 60 s of real time.
    call = asyncio.create_task(http.call(device, "read", None, timeout_ms=60_000))
    async with asyncio.timeout(10):
        while not (await http.list(device.id, 0, 1)).data:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    env.clock.now = T0 + 60_000  # its expiration, by the shared clock
    (ended,) = await job.sweep()
    assert ended.status is RpcStatus.EXPIRED
    async with asyncio.timeout(10):  # the completion, not the caller's 60 s
        with pytest.raises(DeviceTimeout):
            await call


async def test_a_pass_with_a_stale_fencing_token_writes_nothing(env: Env) -> None:
    device = await env.registry.create("d1")
    rpc = await env.rpc()
    newer, older = await env.job(), await env.job()
    first = await rpc.submit(device, "a", None, timeout_ms=1000, expiration_ts=T0 + 1000)
    env.clock.now = T0 + 1000
    newer.use_token(5)
    await newer.run_once()
    assert await env.status(device, first.id) is RpcStatus.EXPIRED
    env.clock.now = T0
    second = await rpc.submit(device, "b", None, timeout_ms=1000, expiration_ts=T0 + 1000)
    env.clock.now = T0 + 1000
    older.use_token(4)  # a deposed leader that has not noticed yet
    with pytest.raises(IotmeshError):
        await older.run_once()
    assert await env.status(device, second.id) is RpcStatus.QUEUED
    # Its claim was released all the same: the current leader ends the request.
    assert [r.id for r in await newer.sweep()] == [second.id]


async def test_the_sweep_pages_past_requests_others_hold(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rpc_housekeeping, "SWEEP_BATCH", 1)  # a page per request
    device = await env.registry.create("d1")
    rpc = await env.rpc()
    job = await env.job()
    held = await rpc.submit(device, "a", None, timeout_ms=1000, expiration_ts=T0 + 1000)
    free = [
        await rpc.submit(device, m, None, timeout_ms=1000, expiration_ts=T0 + 1000 + n)
        for n, m in enumerate("bc")
    ]
    holder = await env.notifier()
    await holder.claim(device.id, [held.id])
    env.clock.now = T0 + 2000
    assert [r.id for r in await job.sweep()] == [r.id for r in free]
    assert await env.status(device, held.id) is RpcStatus.QUEUED
