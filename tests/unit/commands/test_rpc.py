"""RpcService over a real SQLite state store: the lifecycle of requests, persistent
delivery on attach and after a restart, expiry and timeouts on a fake clock."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from iotmesh.commands.rpc import RpcRequest, RpcService
from iotmesh.core.errors import DeviceGone, DeviceTimeout, NotFound, Overloaded, PayloadError
from iotmesh.core.settings import DeviceSettings
from iotmesh.core.types import Device, RpcStatus
from iotmesh.registry import DeviceRegistry
from iotmesh.storage.sqlite.state import SqliteStateStore

T0 = 1_700_000_000_000


class Clock:
    """A settable Unix-ms clock."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now


class Sink:
    """A session's sink that records requests (or fails as told)."""

    def __init__(self, fail: BaseException | None = None) -> None:
        self.got: list[tuple[str, RpcRequest]] = []
        self.fail = fail
        self.arrived = asyncio.Event()

    async def __call__(self, device: Device, request: RpcRequest) -> None:
        if self.fail is not None:
            raise self.fail
        self.got.append((device.name, request))
        self.arrived.set()

    async def next(self) -> RpcRequest:
        async with asyncio.timeout(5):
            while not self.got:
                self.arrived.clear()
                await self.arrived.wait()
        return self.got.pop(0)[1]


class Env:
    def __init__(self, path: Path, clock: Clock) -> None:
        self.path = path
        self.clock = clock
        self.state = SqliteStateStore(path, synchronous="OFF")
        self.registry = DeviceRegistry(self.state)
        self.rpc = self.new_rpc()

    def new_rpc(self, **settings: Any) -> RpcService:
        return RpcService(self.state, DeviceSettings(**settings), clock=self.clock)

    async def restart(self, **settings: Any) -> None:
        """Stop the RPC service and the store, and start both again on the same file."""
        await self.rpc.stop()
        await self.registry.stop()
        self.state = SqliteStateStore(self.path, synchronous="OFF")
        self.registry = DeviceRegistry(self.state)
        await self.registry.start()
        self.rpc = self.new_rpc(**settings)
        await self.rpc.start()


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    e = Env(tmp_path / "state.db", Clock())
    await e.registry.start()
    await e.rpc.start()
    try:
        yield e
    finally:
        await e.rpc.stop()
        await e.registry.stop()


async def _until(check: Callable[[], bool]) -> None:
    async with asyncio.timeout(5):
        while not check():  # noqa: ASYNC110 (a test polls state it cannot await)
            await asyncio.sleep(0.005)


async def _status(env: Env, device: Device, rpc_id: int) -> RpcStatus:
    return (await env.rpc.get(device.id, rpc_id)).status


async def test_call_round_trip_is_stored_successful(env: Env) -> None:
    device = await env.registry.create("d1")
    sink = Sink()
    env.rpc.attach(device.id, sink)
    call = asyncio.create_task(env.rpc.call(device, "setValve", {"open": 1}, timeout_ms=5000))
    request = await sink.next()
    assert (request.method, request.params, request.oneway) == ("setValve", {"open": 1}, False)
    assert await _status(env, device, request.id) is RpcStatus.DELIVERED
    env.clock.now += 7
    assert env.rpc.reply(device.id, request.id, {"ok": True})
    assert await call == {"ok": True}
    record = await env.rpc.get(device.id, request.id)
    assert record.status is RpcStatus.SUCCESSFUL
    assert record.response == {"ok": True}
    assert not record.persistent
    assert record.created_ts == record.sent_ts == record.delivered_ts == T0
    assert record.finished_ts == T0 + 7
    assert not env.rpc.reply(device.id, request.id, {"again": 1})  # finished: ignored
    assert env.rpc.stray_replies == 1


async def test_ids_grow_per_device_and_survive_restart_and_deletion(env: Env) -> None:
    a = await env.registry.create("a")
    b = await env.registry.create("b")
    ids = [(await env.rpc.submit(a, "m", {}, timeout_ms=100)).id for _ in range(3)]
    assert ids == [1, 2, 3]
    assert (await env.rpc.submit(b, "m", {}, timeout_ms=100)).id == 1
    await env.rpc.delete(a.id, 3)
    await env.restart()
    assert (await env.rpc.submit(a, "m", {}, timeout_ms=100)).id == 4


async def test_persistent_request_waits_for_a_session_then_succeeds(env: Env) -> None:
    device = await env.registry.create("d1")
    record = await env.rpc.submit(device, "reboot", {"delay": 1}, timeout_ms=1000)
    assert record.status is RpcStatus.QUEUED
    assert record.persistent
    assert record.expiration_ts == T0 + 86_400_000  # the default expiration
    sink = Sink()
    env.rpc.attach(device.id, sink)  # the device connects: the queued request goes out
    request = await sink.next()
    assert request.id == record.id
    await _until(lambda: True)
    assert env.rpc.reply(device.id, record.id, "done")
    await env.rpc.flushed()
    stored = await env.rpc.get(device.id, record.id)
    assert (stored.status, stored.response) == (RpcStatus.SUCCESSFUL, "done")


async def test_queued_requests_go_out_in_order_through_the_newest_sink(env: Env) -> None:
    device = await env.registry.create("d1")
    for n in range(3):
        await env.rpc.submit(device, f"m{n}", n, timeout_ms=1000)
    old, new = Sink(), Sink()
    env.rpc.attach(device.id, old)
    for n in range(3):
        assert (await old.next()).method == f"m{n}"
    await env.rpc.submit(device, "m3", 3, timeout_ms=1000)
    assert (await old.next()).method == "m3"
    env.rpc.attach(device.id, new)
    await env.rpc.submit(device, "m4", 4, timeout_ms=1000)
    assert (await new.next()).method == "m4"
    assert old.got == []


async def test_a_session_that_refuses_leaves_the_request_to_another(env: Env) -> None:
    device = await env.registry.create("d1")
    good, gone = Sink(), Sink(fail=DeviceGone("unsubscribed"))
    env.rpc.attach(device.id, good)
    env.rpc.attach(device.id, gone)  # newest: tried first
    record = await env.rpc.submit(device, "m", {}, timeout_ms=1000, oneway=True)
    assert (await good.next()).id == record.id
    await env.rpc.flushed()
    stored = await env.rpc.get(device.id, record.id)
    assert stored.status is RpcStatus.SUCCESSFUL  # one-way: done once delivered
    assert stored.delivered_ts == stored.finished_ts


async def test_only_refusing_sessions_keep_it_queued_until_a_good_one(env: Env) -> None:
    device = await env.registry.create("d1")
    detach = env.rpc.attach(device.id, Sink(fail=DeviceGone("not subscribed")))
    record = await env.rpc.submit(device, "m", {}, timeout_ms=1000)
    await asyncio.sleep(0.05)
    assert await _status(env, device, record.id) is RpcStatus.QUEUED
    detach()
    good = Sink()
    env.rpc.attach(device.id, good)
    assert (await good.next()).id == record.id


async def test_a_failing_session_fails_the_request(env: Env) -> None:
    device = await env.registry.create("d1")
    env.rpc.attach(device.id, Sink(fail=RuntimeError("socket broke")))
    with pytest.raises(DeviceGone, match="socket broke"):
        await env.rpc.call(device, "m", {}, timeout_ms=2000)
    page = await env.rpc.list(device.id, 0, 10)
    assert page.data[0].status is RpcStatus.FAILED
    assert page.data[0].error is not None


async def test_call_without_session_expires_and_without_reply_times_out(env: Env) -> None:
    device = await env.registry.create("d1")
    with pytest.raises(DeviceTimeout):
        await env.rpc.call(device, "m", {}, timeout_ms=50)
    sink = Sink()
    env.rpc.attach(device.id, sink)
    with pytest.raises(DeviceTimeout):
        await env.rpc.call(device, "m", {}, timeout_ms=50)
    page = await env.rpc.list(device.id, 0, 10)
    assert [r.status for r in page.data] == [RpcStatus.TIMEOUT, RpcStatus.EXPIRED]
    assert page.total == 2


async def test_expiry_job_on_a_fake_clock(env: Env) -> None:
    device = await env.registry.create("d1")
    queued = await env.rpc.submit(device, "never", {}, timeout_ms=500, expiration_ts=T0 + 1000)
    sink = Sink()
    other = await env.registry.create("d2")
    env.rpc.attach(other.id, sink)
    sent = await env.rpc.submit(other, "noreply", {}, timeout_ms=500)
    await sink.next()
    env.clock.now = T0 + 499
    assert env.rpc.expire_due() == 0
    env.clock.now = T0 + 500
    assert env.rpc.expire_due() == 1  # sent at T0, no reply within 500 ms
    env.clock.now = T0 + 1000
    assert env.rpc.expire_due() == 1  # never delivered before its expiration
    assert await _status(env, other, sent.id) is RpcStatus.TIMEOUT
    assert await _status(env, device, queued.id) is RpcStatus.EXPIRED
    assert not env.rpc.reply(other.id, sent.id, "late")


async def test_restart_keeps_persistent_requests_and_fails_waiting_calls(env: Env) -> None:
    device = await env.registry.create("d1")
    queued = await env.rpc.submit(device, "later", {}, timeout_ms=60_000)
    sink = Sink()
    detach = env.rpc.attach(device.id, sink)
    delivered = await env.rpc.submit(device, "sent", {}, timeout_ms=60_000)
    await sink.next()  # "later" went out first
    await sink.next()
    detach()
    call = asyncio.create_task(env.rpc.call(device, "waiting", {}, timeout_ms=60_000))
    await _until(lambda: env.rpc.stats()["open"] == 3)
    await env.restart()
    with pytest.raises(DeviceTimeout, match="shutting down"):
        await call
    statuses = {r.method: r.status for r in (await env.rpc.list(device.id, 0, 10)).data}
    assert statuses == {
        "later": RpcStatus.DELIVERED,
        "sent": RpcStatus.DELIVERED,
        "waiting": RpcStatus.FAILED,
    }
    # A DELIVERED request still takes its reply after the restart.
    assert env.rpc.reply(device.id, delivered.id, {"late": True})
    assert env.rpc.reply(device.id, queued.id, 1)
    await env.rpc.flushed()
    assert await _status(env, device, delivered.id) is RpcStatus.SUCCESSFUL


async def test_restart_delivers_queued_and_resends_sent(env: Env) -> None:
    device = await env.registry.create("d1")
    queued = await env.rpc.submit(device, "queued", {}, timeout_ms=60_000)
    hang = asyncio.Event()

    async def stuck(target: Device, request: RpcRequest) -> None:
        await hang.wait()  # the platform stops while the sink is busy: stays SENT

    gateway = await env.registry.create("gw", gateway=True)
    child = await env.registry.create("child", gateway_id=gateway.id)
    sent = await env.rpc.submit(child, "sent", {}, timeout_ms=60_000)
    env.rpc.attach_gateway(gateway.id, stuck)
    await _until(lambda: env.rpc.stats()["open"] == 2)
    await asyncio.sleep(0.05)
    await env.restart()
    sink, gw_sink = Sink(), Sink()
    env.rpc.attach(device.id, sink)
    env.rpc.attach_gateway(gateway.id, gw_sink)  # devices behind a gateway get theirs
    assert (await sink.next()).id == queued.id
    assert (await gw_sink.next()).id == sent.id
    assert gw_sink.got == []
    assert sink.got == []


async def test_limits_and_validation(env: Env) -> None:
    await env.restart(rpc_max_open=2)
    device = await env.registry.create("d1")
    await env.rpc.submit(device, "a", {}, timeout_ms=100)
    await env.rpc.submit(device, "b", {}, timeout_ms=100)
    with pytest.raises(Overloaded):
        await env.rpc.submit(device, "c", {}, timeout_ms=100)
    with pytest.raises(PayloadError):
        await env.rpc.submit(device, "", {}, timeout_ms=100)
    with pytest.raises(PayloadError):
        await env.rpc.submit(device, "m", {}, timeout_ms=0)
    with pytest.raises(PayloadError):
        await env.rpc.submit(device, "m", {}, timeout_ms=100, expiration_ts=T0 - 1)
    with pytest.raises(NotFound):
        await env.rpc.get(device.id, 99)
    with pytest.raises(NotFound):
        await env.rpc.delete(device.id, 99)


async def test_list_filters_and_pages(env: Env) -> None:
    device = await env.registry.create("d1")
    for n in range(5):
        await env.rpc.submit(device, f"m{n}", {}, timeout_ms=100)
    await env.rpc.delete(device.id, 5)
    sink = Sink()
    env.rpc.attach(device.id, sink)
    await sink.next()
    env.rpc.reply(device.id, 1, {})
    page = await env.rpc.list(device.id, 0, 2)
    assert ([r.id for r in page.data], page.total, page.has_next) == ([4, 3], 4, True)
    done = await env.rpc.list(device.id, 0, 10, [RpcStatus.SUCCESSFUL])
    assert [r.id for r in done.data] == [1]


async def test_deleted_device_loses_its_requests(env: Env) -> None:
    device = await env.registry.create("d1")
    call = asyncio.create_task(env.rpc.call(device, "m", {}, timeout_ms=5000))
    await _until(lambda: env.rpc.stats()["open"] == 1)
    await env.registry.delete(device.id)
    env.rpc.forget(device.id)
    with pytest.raises(DeviceGone):
        await call
    assert (await env.rpc.list(device.id, 0, 10)).total == 0


async def test_memory_store_when_built_without_one() -> None:
    rpc = RpcService()
    await rpc.start()
    try:
        device = Device("id-1", "d", "default", None, 0, "tok")
        sink = Sink()
        rpc.attach(device.id, sink)
        call = asyncio.create_task(rpc.call(device, "m", 1, timeout_ms=5000))
        request = await sink.next()
        assert rpc.reply(device.id, request.id, 2)
        assert await call == 2
        assert (await rpc.get(device.id, request.id)).status is RpcStatus.SUCCESSFUL
    finally:
        await rpc.stop()


async def test_a_deleted_request_is_never_delivered(env: Env) -> None:
    device = await env.registry.create("d1")
    gone = await env.rpc.submit(device, "gone", {}, timeout_ms=1000)
    kept = await env.rpc.submit(device, "kept", {}, timeout_ms=1000)
    await env.rpc.delete(device.id, gone.id)
    sink = Sink()
    env.rpc.attach(device.id, sink)
    assert (await sink.next()).id == kept.id
    await asyncio.sleep(0.05)
    assert sink.got == []
