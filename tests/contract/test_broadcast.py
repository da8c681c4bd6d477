"""The contract of `Bus.broadcast()`, live fan-out between processes, on each engine
(nats-server, redis-server on loopback): every subscriber, the publisher's own
connection included, gets every message of its topic in order; topics and namespaces
are apart; a closed subscription gets nothing more; a subscriber whose connection came
back is told that it may have missed messages, and gets the later ones. The
in-process bus has no broadcast."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from iotmesh.bus import make_bus
from iotmesh.bus.broadcast import Broadcast
from iotmesh.core.settings import BusSettings
from tests.contract.bus_backends import BACKENDS, BusHarness
from tests.influxd import free_port
from tests.redis_hot import RedisOutage

ENGINES = [b for b in BACKENDS if b.durable]


class Heard:
    """A handler that records what it is given (None: a gap)."""

    def __init__(self) -> None:
        self.got: list[bytes | None] = []
        self.changed = asyncio.Event()

    async def __call__(self, data: bytes | None) -> None:
        self.got.append(data)
        self.changed.set()

    async def wait(self, count: int) -> None:
        async with asyncio.timeout(20):
            while len(self.got) < count:
                self.changed.clear()
                await self.changed.wait()


@pytest.fixture(params=ENGINES, ids=lambda b: b.name)
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[BusHarness]:
    h = BusHarness(request.param)
    try:
        yield h
    finally:
        await h.close()


async def _broadcast(harness: BusHarness) -> Broadcast:
    broadcast = (await harness.bus()).broadcast()
    assert broadcast is not None
    return broadcast


async def test_every_subscriber_gets_every_message_in_order(harness: BusHarness) -> None:
    one, two = await _broadcast(harness), await _broadcast(harness)
    heard = [Heard(), Heard()]
    subs = [await one.subscribe("t", heard[0]), await two.subscribe("t", heard[1])]
    sent = [f"m{n}".encode() for n in range(50)]
    for data in sent:
        await one.publish("t", data)
    for h in heard:
        await h.wait(len(sent))
        assert h.got == sent  # the publisher's own connection too
    for sub in subs:
        await sub.close()


async def test_topics_and_namespaces_are_apart(harness: BusHarness) -> None:
    here = await _broadcast(harness)
    other_ns = make_bus(
        harness.settings.model_copy(update={"namespace": f"t{uuid.uuid4().hex[:10]}"})
    )
    await other_ns.start()
    try:
        elsewhere = other_ns.broadcast()
        assert elsewhere is not None
        a, b, c = Heard(), Heard(), Heard()
        subs = [
            await here.subscribe("a", a),
            await here.subscribe("b", b),
            await elsewhere.subscribe("a", c),
        ]
        await elsewhere.publish("a", b"other namespace")
        await here.publish("b", b"to b")
        await here.publish("a", b"to a")
        await a.wait(1)
        await b.wait(1)
        await c.wait(1)
        assert (a.got, b.got, c.got) == ([b"to a"], [b"to b"], [b"other namespace"])
        for sub in subs:
            await sub.close()
    finally:
        await other_ns.stop()


async def test_a_closed_subscription_gets_nothing_more(harness: BusHarness) -> None:
    broadcast = await _broadcast(harness)
    gone, staying = Heard(), Heard()
    sub = await broadcast.subscribe("t", gone)
    kept = await broadcast.subscribe("t", staying)
    await broadcast.publish("t", b"1")
    await gone.wait(1)
    await sub.close()
    await broadcast.publish("t", b"2")
    await staying.wait(2)  # in order: had the closed one got "2", it would have by now
    assert gone.got == [b"1"]
    await kept.close()


async def test_the_in_process_bus_has_none() -> None:
    bus = make_bus(BusSettings())
    await bus.start()
    try:
        assert bus.broadcast() is None
    finally:
        await bus.stop()


# -- a connection that comes back ----------------------------------------------------


@contextlib.contextmanager
def _nats_server(port: int, store: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A private nats-server with JetStream on `port`, stopped by its PID."""
    proc = subprocess.Popen(
        ["nats-server", "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(store)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait(10)


async def _until_listening(port: int) -> None:
    async with asyncio.timeout(10):
        while True:
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                return
            await asyncio.sleep(0.05)


@pytest.mark.parametrize("engine", [b.name for b in ENGINES])
async def test_a_subscriber_is_told_when_its_connection_came_back(
    engine: str, tmp_path: Path
) -> None:
    values = {"backend": engine, "namespace": f"t{uuid.uuid4().hex[:10]}", "request_timeout_s": 2.0}
    heard = Heard()
    if engine == "redis":
        relay = RedisOutage()
        await relay.start()
        bus = make_bus(BusSettings(**values, redis_url=relay.url))  # type: ignore[arg-type]
        await bus.start()
        try:
            broadcast = bus.broadcast()
            assert broadcast is not None
            sub = await broadcast.subscribe("t", heard)
            await relay.cut()
            await relay.start()  # the same port again
            await heard.wait(1)
            assert heard.got == [None]
            await broadcast.publish("t", b"after")
            await heard.wait(2)
            assert heard.got == [None, b"after"]
            await sub.close()
        finally:
            await bus.stop()
            await relay.cut()
        return
    port = free_port()
    values["nats_url"] = f"nats://127.0.0.1:{port}"
    with _nats_server(port, tmp_path / "js") as first:
        await _until_listening(port)
        bus = make_bus(BusSettings(**values))  # type: ignore[arg-type]
        await bus.start()
        broadcast = bus.broadcast()
        assert broadcast is not None
        sub = await broadcast.subscribe("t", heard)
        first.terminate()
        first.wait(10)
    with _nats_server(port, tmp_path / "js"):
        try:
            await heard.wait(1)  # the client reconnected by itself
            assert heard.got == [None]
            await broadcast.publish("t", b"after")
            await heard.wait(2)
            assert heard.got == [None, b"after"]
            await sub.close()
        finally:
            await bus.stop()
