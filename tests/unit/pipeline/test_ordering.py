"""Per-device order on the way into and out of the pipeline: TelemetryIngest and BusSink."""

from __future__ import annotations

import asyncio

import pytest

from iotmesh.bus.interface import BusError, Publisher
from iotmesh.core.errors import Overloaded
from iotmesh.core.types import TelemetryMessage, TsRecord
from iotmesh.pipeline.ingest import TelemetryIngest
from iotmesh.pipeline.sink import BusSink
from iotmesh.pipeline.stages import decode


class GatedPublisher(Publisher):
    """Stores publishes in arrival order; a publish whose key is in `held` waits for
    `gate`, as a publish to a full engine partition waits for room."""

    def __init__(self) -> None:
        self.stored: list[tuple[str, str, str]] = []  # (subject, key, msg_id)
        self.gate = asyncio.Event()
        self.held: set[int] = set()
        self.calls = 0
        self.fail_on: str | None = None

    async def publish(
        self, subject: str, data: bytes, *, key: str, msg_id: str, timeout: float | None = None
    ) -> None:
        call = self.calls
        self.calls += 1
        if call in self.held:
            await self.gate.wait()
        if key == self.fail_on:
            raise BusError("engine down")
        self.stored.append((subject, key, msg_id))


def _records(n: int) -> list[TsRecord]:
    return [TsRecord(ts=n, values={"seq": n})]


async def test_a_devices_submits_are_stored_in_call_order() -> None:
    bus = GatedPublisher()
    bus.held = {0}  # the first publish finds the engine full
    ingest = TelemetryIngest(bus, None)
    first = asyncio.create_task(ingest.submit("dev-1", _records(0)))
    second = asyncio.create_task(ingest.submit("dev-1", _records(1)))
    other = asyncio.create_task(ingest.submit("dev-2", _records(0)))
    await asyncio.sleep(0.01)
    assert [key for _, key, _ in bus.stored] == ["dev-2"]  # other devices do not wait
    assert not second.done()
    assert not ingest.submit_nowait("dev-1", _records(2), lambda _: None)
    bus.gate.set()
    await asyncio.gather(first, second, other)
    ids = [msg_id for _, key, msg_id in bus.stored if key == "dev-1"]
    assert ids == sorted(ids, key=lambda i: int(i.rsplit("-", 1)[1]))
    assert ingest._tails == {}  # nothing left behind


async def test_waiting_behind_an_earlier_submit_counts_against_the_timeout() -> None:
    bus = GatedPublisher()
    bus.held = {0}
    ingest = TelemetryIngest(bus, 0.05)
    first = asyncio.create_task(ingest.submit("dev-1", _records(0)))
    await asyncio.sleep(0)
    with pytest.raises(Overloaded):
        await ingest.submit("dev-1", _records(1))
    third = asyncio.create_task(ingest.submit("dev-1", _records(2)))
    await asyncio.sleep(0.1)
    assert bus.stored == []  # nothing overtook the first
    with pytest.raises(Overloaded):  # it waited past its timeout too
        await third
    bus.gate.set()
    await first
    await ingest.submit("dev-1", _records(3))  # the queue is free again
    assert len(bus.stored) == 2


def _message(device: str, n: int) -> TelemetryMessage:
    return TelemetryMessage(
        msg_id=f"m{device}{n}", device_id=device, received_ts=n, records=_records(n)
    )


async def test_bus_sink_publishes_each_device_in_order_with_a_derived_id() -> None:
    bus = GatedPublisher()
    bus.held = {0}
    sink = BusSink(bus)
    messages = [_message("a", 0), _message("b", 0), _message("a", 1), _message("b", 1)]
    task = asyncio.create_task(sink.put(messages))
    await asyncio.sleep(0.01)
    assert [key for _, key, _ in bus.stored] == ["b", "b"]  # a waits on its first
    bus.gate.set()
    await task
    assert [(s, i) for s, k, i in bus.stored if k == "a"] == [
        ("store.a", "store-ma0"),
        ("store.a", "store-ma1"),
    ]


async def test_bus_sink_raises_the_first_failure_after_every_publish_ended() -> None:
    bus = GatedPublisher()
    bus.fail_on = "a"
    with pytest.raises(BusError):
        await BusSink(bus).put([_message("a", 0), _message("b", 0)])
    assert [key for _, key, _ in bus.stored] == ["b"]


def test_store_messages_decode_as_telemetry() -> None:
    from iotmesh.pipeline.stages import encode_message

    message = _message("a", 3)
    assert decode(encode_message(message)) == message
