"""Pipeline.handle: settle every delivery by what happened to its message."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

import pytest

from iotmesh.bus.interface import Delivery
from iotmesh.bus.memory import MemoryBus
from iotmesh.core.errors import PayloadError, StorageError
from iotmesh.core.settings import BusSettings, WriterSettings
from iotmesh.core.types import TelemetryMessage, TsPoint, TsRecord
from iotmesh.pipeline.latest import LatestValues
from iotmesh.pipeline.service import Pipeline
from iotmesh.pipeline.stages import encode_message
from iotmesh.storage.timeseries import SeriesWrite
from iotmesh.storage.writer import BatchWriter
from tests.unit.doubles import RecordingStore


class FakeDelivery(Delivery):
    """A delivery that remembers how the handler settled it."""

    def __init__(self, data: bytes, msg_id: str, key: str = "dev-1") -> None:
        self.subject = f"telemetry.{key}"
        self.key = key
        self.data = data
        self.msg_id = msg_id
        self.attempt = 1
        self.state = "pending"
        self.delay = 0.0
        self.reason = ""

    def ack(self) -> None:
        self.state = "ack"

    def nack(self, delay: float = 0.0) -> None:
        self.state = "nack"
        self.delay = delay

    def term(self, reason: str = "") -> None:
        self.state = "term"
        self.reason = reason

    @property
    def settled(self) -> bool:
        return self.state != "pending"


def message(msg_id: str, device_id: str, *records: TsRecord) -> FakeDelivery:
    data = encode_message(TelemetryMessage(msg_id, device_id, 1000, list(records)))
    return FakeDelivery(data, msg_id, key=device_id)


@contextlib.asynccontextmanager
async def pipeline_with(
    store: RecordingStore, latest: LatestValues | None = None
) -> AsyncIterator[tuple[Pipeline, BatchWriter]]:
    writer = BatchWriter(store, WriterSettings())
    await writer.start()
    try:
        # handle() never touches the bus; an unstarted MemoryBus stands in for it.
        bus = MemoryBus(BusSettings(partitions=1, partition_queue=1))
        yield Pipeline(bus, writer, latest or LatestValues()), writer
    finally:
        await writer.stop()


async def test_valid_messages_are_acked_after_their_write() -> None:
    store = RecordingStore()
    deliveries = [
        message("m1", "dev-1", TsRecord(1, {"t": 20.5})),
        message("m2", "dev-2", TsRecord(2, {"t": 21}), TsRecord(3, {"on": True})),
    ]
    states_during_commit: list[list[str]] = []
    store.on_write = lambda: states_during_commit.append([d.state for d in deliveries])

    async with pipeline_with(store) as (pipeline, _):
        await pipeline.handle(deliveries)

    assert states_during_commit == [["pending", "pending"]]
    assert [d.state for d in deliveries] == ["ack", "ack"]
    [batch] = store.writes
    assert [(s.entity_id, [(r.ts, r.values) for r in s.records]) for s in batch] == [
        ("dev-1", [(1, {"t": 20.5})]),
        ("dev-2", [(2, {"t": 21}), (3, {"on": True})]),
    ]


async def test_undecodable_message_is_termed_and_the_rest_stored() -> None:
    store = RecordingStore()
    good1 = message("m1", "dev-1", TsRecord(1, {"t": 1}))
    garbage = FakeDelivery(b"\xc1 not msgpack", "m2")
    good2 = message("m3", "dev-3", TsRecord(3, {"t": 3}))

    async with pipeline_with(store) as (pipeline, _):
        await pipeline.handle([good1, garbage, good2])

    assert (good1.state, garbage.state, good2.state) == ("ack", "term", "ack")
    assert "undecodable" in garbage.reason
    assert pipeline.dropped == 1
    assert [s.entity_id for batch in store.writes for s in batch] == ["dev-1", "dev-3"]


async def test_message_without_values_is_termed_by_the_validator() -> None:
    store = RecordingStore()
    empty = message("m1", "dev-1", TsRecord(1, {}))
    good = message("m2", "dev-2", TsRecord(2, {"t": 2}))

    async with pipeline_with(store) as (pipeline, _):
        await pipeline.handle([empty, good])

    assert (empty.state, good.state) == ("term", "ack")
    assert "no values" in empty.reason
    assert [s.entity_id for batch in store.writes for s in batch] == ["dev-2"]


async def test_batch_with_nothing_valid_writes_nothing() -> None:
    store = RecordingStore()
    deliveries = [FakeDelivery(b"", "m1"), FakeDelivery(b"\x93\x01", "m2")]

    async with pipeline_with(store) as (pipeline, _):
        await pipeline.handle(deliveries)

    assert [d.state for d in deliveries] == ["term", "term"]
    assert pipeline.dropped == 2
    assert store.writes == []


async def test_storage_error_from_the_writer_nacks_for_redelivery() -> None:
    store = RecordingStore()
    good = message("m1", "dev-1", TsRecord(1, {"t": 1}))
    garbage = FakeDelivery(b"\xc1", "m2")

    async with pipeline_with(store) as (pipeline, writer):
        await writer.stop()  # a stopped writer refuses with StorageError
        with pytest.raises(StorageError):
            await writer.write([SeriesWrite("probe", [TsRecord(1, {"t": 1})])])
        await pipeline.handle([good, garbage])

    assert good.state == "nack"
    assert good.delay > 0
    assert garbage.state == "term"
    assert store.writes == []


async def test_cached_latest_values_follow_the_commit() -> None:
    store = RecordingStore()
    latest = LatestValues()
    await latest.fill("dev-1", {"t": TsPoint(1, 10)})

    async with pipeline_with(store, latest) as (pipeline, _):
        await pipeline.handle([message("m1", "dev-1", TsRecord(5, {"t": 11, "h": 40}))])

    assert await latest.get("dev-1") == {"t": TsPoint(5, 11), "h": TsPoint(5, 40)}


async def test_every_delivery_is_settled_when_handle_returns() -> None:
    store = RecordingStore()
    deliveries = [
        message("m1", "dev-1", TsRecord(1, {"t": 1})),
        FakeDelivery(b"junk", "m2"),
        message("m3", "dev-1", TsRecord(1, {})),
    ]

    async with pipeline_with(store) as (pipeline, _):
        await asyncio.wait_for(pipeline.handle(deliveries), timeout=2)

    assert all(d.settled for d in deliveries)


class RefusingStore(RecordingStore):
    """Refuses, as data, any batch holding a negative timestamp."""

    async def write(self, batch: Sequence[SeriesWrite]) -> None:
        if any(r.ts < 0 for s in batch for r in s.records):
            raise PayloadError("timestamp out of range")
        await super().write(batch)


async def test_a_message_the_store_refuses_is_termed_and_the_rest_stored() -> None:
    store = RefusingStore()
    good1 = message("m1", "dev-1", TsRecord(1, {"t": 1}))
    bad = message("m2", "dev-2", TsRecord(-5, {"t": 2}))
    good2 = message("m3", "dev-1", TsRecord(3, {"t": 3}))

    async with pipeline_with(store) as (pipeline, _):
        await pipeline.handle([good1, bad, good2])

    assert (good1.state, bad.state, good2.state) == ("ack", "term", "ack")
    assert "out of range" in bad.reason
    assert pipeline.dropped == 1
    assert store.entities() == ["dev-1", "dev-1"]
