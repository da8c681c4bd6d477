"""RPC wake-ups across processes: RpcService instances ("processes") over one SQLite
state store file, wake-ups, completions and claims on each notifier: the Redis one
(hot state) and the NATS one (the bus's connection: core subjects and KV leases). A
request stored by one is delivered through a session held by another, promptly (there
is no polling: the wake-up or the session's attach does it), once, and handed on when
a session goes; a two-way call waits where it was made and gets the reply given to
another process."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from iotmesh.bus import make_bus
from iotmesh.bus.interface import Bus
from iotmesh.bus.nats import NatsBus
from iotmesh.bus.nats_rpc import NatsRpcNotifier
from iotmesh.commands.rpc import RpcRequest, RpcService
from iotmesh.commands.wakeups import CLAIM_TTL_S, RpcNotifier
from iotmesh.core.errors import DeviceGone, DeviceTimeout
from iotmesh.core.settings import BusSettings, DeviceSettings
from iotmesh.core.types import Device, RpcStatus
from iotmesh.registry import DeviceRegistry
from iotmesh.storage.redis import RedisRpcNotifier
from iotmesh.storage.sqlite.state import SqliteStateStore
from tests.redis_hot import HotFactory, dead_port

NATS_URL = "nats://127.0.0.1:4222"


class Sink:
    """A session's sink that records requests, or refuses them (`DeviceGone`)."""

    def __init__(self, refuse: bool = False) -> None:
        self.got: list[RpcRequest] = []
        self.refuse = refuse
        self.tries = 0
        self.changed = asyncio.Event()

    async def __call__(self, device: Device, request: RpcRequest) -> None:
        self.tries += 1
        self.changed.set()
        if self.refuse:
            raise DeviceGone("the session is closing")
        self.got.append(request)

    async def wait(self, *, got: int = 0, tries: int = 0) -> None:
        async with asyncio.timeout(10):
            while len(self.got) < got or self.tries < tries:
                self.changed.clear()
                await self.changed.wait()


class Cluster:
    """Processes sharing a state store file and a Redis or NATS namespace."""

    def __init__(self, engine: str, path: Path, redis_hot: HotFactory) -> None:
        self.engine = engine
        self.path = path
        self.redis_hot = redis_hot
        self.namespace = f"t{uuid.uuid4().hex[:10]}"
        self.stack: list[tuple[RpcService, SqliteStateStore]] = []
        self.buses: list[Bus] = []

    async def _bus(self) -> NatsBus:
        settings = BusSettings(backend="nats", namespace=self.namespace, nats_url=NATS_URL)
        bus = make_bus(settings)
        await bus.start()
        self.buses.append(bus)
        assert isinstance(bus, NatsBus)
        return bus

    async def notifier(self, **hot_settings: object) -> RpcNotifier:
        if self.engine == "nats":
            return NatsRpcNotifier(await self._bus(), CLAIM_TTL_S)
        return RedisRpcNotifier(await self.redis_hot(**hot_settings), CLAIM_TTL_S)

    async def process(self, **hot_settings: object) -> RpcService:
        state = SqliteStateStore(self.path, synchronous="OFF")
        await state.open()
        rpc = RpcService(state, DeviceSettings(), notifier=await self.notifier(**hot_settings))
        await rpc.start()
        self.stack.append((rpc, state))
        return rpc

    async def close(self) -> None:
        for rpc, state in reversed(self.stack):
            await rpc.stop()
            await state.close()
        if self.buses:
            cleaner: Any = self.buses[0]
            await cleaner.delete_everything()
        for bus in self.buses:
            await bus.stop()


@pytest.fixture(params=["redis", "nats"])
async def cluster(
    request: pytest.FixtureRequest, tmp_path: Path, redis_hot: HotFactory
) -> AsyncIterator[Cluster]:
    c = Cluster(request.param, tmp_path / "state.db", redis_hot)
    try:
        yield c
    finally:
        await c.close()


async def _device(cluster: Cluster) -> Device:
    state = SqliteStateStore(cluster.path, synchronous="OFF")
    registry = DeviceRegistry(state)
    await registry.start()
    try:
        return await registry.create("valve")
    finally:
        await registry.stop()


async def _status(rpc: RpcService, device: Device, rpc_id: int) -> RpcStatus:
    return (await rpc.get(device.id, rpc_id)).status


async def test_a_request_stored_by_one_process_reaches_the_session_of_another(
    cluster: Cluster,
) -> None:
    device = await _device(cluster)
    http, transport = await cluster.process(), await cluster.process()
    sink = Sink()
    transport.attach(device.id, sink)
    record = await http.submit(device, "open", {"pct": 40}, timeout_ms=5000)
    assert record.status is RpcStatus.QUEUED
    await sink.wait(got=1)  # woken: nothing polls
    assert (sink.got[0].id, sink.got[0].method, sink.got[0].params) == (
        record.id,
        "open",
        {"pct": 40},
    )
    assert transport.reply(device.id, record.id, {"done": True})
    await transport.flushed()
    stored = await http.get(device.id, record.id)
    assert (stored.status, stored.response) == (RpcStatus.SUCCESSFUL, {"done": True})


async def test_a_session_attaching_later_anywhere_loads_what_was_handed_off(
    cluster: Cluster,
) -> None:
    device = await _device(cluster)
    http, transport = await cluster.process(), await cluster.process()
    first = await http.submit(device, "a", None, timeout_ms=5000)
    second = await http.submit(device, "b", None, timeout_ms=5000, oneway=True)
    sink = Sink()
    transport.attach(device.id, sink)
    await sink.wait(got=2)
    assert [r.id for r in sink.got] == [first.id, second.id]
    await transport.flushed()
    assert await _status(http, device, second.id) is RpcStatus.SUCCESSFUL
    assert await _status(http, device, first.id) is RpcStatus.DELIVERED


async def test_two_sessions_in_two_processes_get_a_request_once(cluster: Cluster) -> None:
    device = await _device(cluster)
    http = await cluster.process()
    one, two = await cluster.process(), await cluster.process()
    sinks = [Sink(), Sink()]
    one.attach(device.id, sinks[0])
    two.attach(device.id, sinks[1])
    records = [await http.submit(device, f"m{n}", n, timeout_ms=5000) for n in range(5)]
    async with asyncio.timeout(10):
        while sum(len(s.got) for s in sinks) < len(records):  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)  # would a second copy follow?
    got = sorted(r.id for s in sinks for r in s.got)
    assert got == [r.id for r in records]


async def test_a_closing_session_hands_its_requests_to_another_process(cluster: Cluster) -> None:
    device = await _device(cluster)
    http, leaving, staying = [await cluster.process() for _ in range(3)]
    refusing = Sink(refuse=True)
    detach = leaving.attach(device.id, refusing)
    record = await http.submit(device, "m", None, timeout_ms=5000)
    await refusing.wait(tries=1)  # `leaving` claimed it; its session refused
    sink = Sink()
    staying.attach(device.id, sink)  # loads nothing: `leaving` holds the request
    detach()  # → handed back, claim released, others woken
    await sink.wait(got=1)
    assert sink.got[0].id == record.id


async def test_without_redis_requests_are_stored_and_delivered_on_attach(
    cluster: Cluster,
) -> None:
    if cluster.engine != "redis":
        pytest.skip("a NATS bus does not start without its server")
    device = await _device(cluster)
    down = {"url": f"redis://127.0.0.1:{dead_port()}/15", "timeout_s": 0.3}
    http = await cluster.process(**down)
    record = await http.submit(device, "m", None, timeout_ms=5000)
    assert record.status is RpcStatus.QUEUED
    transport = await cluster.process()
    sink = Sink()
    transport.attach(device.id, sink)
    await sink.wait(got=1)


async def test_a_two_way_call_gets_the_reply_given_to_another_process(cluster: Cluster) -> None:
    device = await _device(cluster)
    http, transport = await cluster.process(), await cluster.process()
    sink = Sink()
    transport.attach(device.id, sink)
    call = asyncio.create_task(http.call(device, "read", {"k": 1}, timeout_ms=10_000))
    await sink.wait(got=1)
    request = sink.got[0]
    assert (request.method, request.params, request.oneway) == ("read", {"k": 1}, False)
    assert transport.reply(device.id, request.id, {"v": 42})
    assert await call == {"v": 42}  # woken by the completion, read from the store
    stored = await http.get(device.id, request.id)
    assert (stored.status, stored.response) == (RpcStatus.SUCCESSFUL, {"v": 42})


async def test_a_one_way_call_returns_once_another_process_delivered_it(
    cluster: Cluster,
) -> None:
    device = await _device(cluster)
    http, transport = await cluster.process(), await cluster.process()
    sink = Sink()
    transport.attach(device.id, sink)
    assert await http.call(device, "blink", None, timeout_ms=10_000, oneway=True) is None
    assert [r.method for r in sink.got] == ["blink"]
    assert await _status(http, device, sink.got[0].id) is RpcStatus.SUCCESSFUL


async def test_a_call_no_session_takes_expires_where_it_waits(cluster: Cluster) -> None:
    device = await _device(cluster)
    http = await cluster.process()
    await cluster.process()  # a transport without the device's session
    with pytest.raises(DeviceTimeout):
        await http.call(device, "read", None, timeout_ms=300)
    page = await http.list(device.id, 0, 10)
    assert [r.status for r in page.data] == [RpcStatus.EXPIRED]


async def test_a_call_whose_device_attaches_where_it_waits_is_delivered_there(
    cluster: Cluster,
) -> None:
    device = await _device(cluster)
    http = await cluster.process()
    call = asyncio.create_task(http.call(device, "read", None, timeout_ms=10_000))
    await asyncio.sleep(0.2)  # stored and handed off: no session anywhere yet
    sink = Sink()
    http.attach(device.id, sink)  # the device comes to the waiting process itself
    await sink.wait(got=1)
    assert http.reply(device.id, sink.got[0].id, "ok")
    assert await call == "ok"
