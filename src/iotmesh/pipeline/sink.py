"""Where the pipeline puts processed messages: the store, or the bus towards the writer.

`iotmesh run` and the `writer` service store with `WriterSink` (the batch writer's group
commit). `pipeline` workers of `iotmesh serve` use `BusSink`: they publish each processed
message to `store.<device>`, which the single `writer` service consumes. The SQLite store
has ONE writer process, so decode/validate/rules scale out over workers while commits
stay in one place; the hop costs one more engine round trip per batch.

Exactly once: the store hop's message id is derived from the ingest `msg_id` (prefixed:
the Redis bus keeps one duplicate window per namespace, not per stream, so the same id
would be taken for a duplicate of the telemetry message itself). So when a worker dies
after publishing but before acking the telemetry, its successor's re-publish is dropped
by the engine's duplicate window; past that window the write is still idempotent (the
store keeps one point per (device, key, ts): the same point again overwrites itself).
Tracing: `traces` are the contexts of the pipeline's `pipeline.handle` spans; the writer
hangs its `storage.commit` spans under them. On the store hop a message keeps the
`traceparent` it came with, so the writer service's `pipeline.handle` span is a sibling
of the worker's, both children of the transport's `bus.publish`.
Per-device order: both hops are partitioned by device id and each partition has one
holder at a time; `BusSink` publishes the messages of one device one after the other.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Sequence
from typing import Protocol

from iotmesh.bus.interface import Publisher
from iotmesh.core.tracing import Context
from iotmesh.core.types import TelemetryMessage
from iotmesh.pipeline.stages import encode_message
from iotmesh.storage.timeseries import SeriesWrite
from iotmesh.storage.writer import BatchWriter

STORE = "store"


def store_subject(device_id: str) -> str:
    """The subject of a device's processed messages, on their way to the writer."""
    return f"{STORE}.{device_id}"


class Sink(Protocol):
    """The pipeline's last step; returns when the messages are durable beyond it.

    Raises:
        PayloadError: (store) the data cannot be stored; the pipeline retries one by one.
        StorageError | BusError: failed for now; the pipeline has them redelivered.
    """

    async def put(
        self, messages: Sequence[TelemetryMessage], traces: Sequence[Context] | None = None
    ) -> None: ...


class WriterSink:
    """Commits messages through the batch writer (group commit)."""

    def __init__(self, writer: BatchWriter) -> None:
        self.writer = writer

    async def put(
        self, messages: Sequence[TelemetryMessage], traces: Sequence[Context] | None = None
    ) -> None:
        batch = [SeriesWrite(m.device_id, m.records) for m in messages]
        await self.writer.write(batch, traces=traces)


class BusSink:
    """Publishes processed messages to `store.<device>`, each device's in order.

    At most `concurrency` devices publish at once: an engine client has a bounded
    connection pool (redis-py: 100), which a batch of 512 devices would exhaust.
    """

    def __init__(self, bus: Publisher, concurrency: int = 32) -> None:
        self._bus = bus
        self._room = asyncio.Semaphore(concurrency)

    async def put(
        self, messages: Sequence[TelemetryMessage], traces: Sequence[Context] | None = None
    ) -> None:
        by_device: dict[str, list[TelemetryMessage]] = collections.defaultdict(list)
        for message in messages:
            by_device[message.device_id].append(message)
        # Every publish runs to its end (no task is left behind); then the first
        # failure, if any, is raised as it is, so the pipeline can tell what failed.
        results = await asyncio.gather(
            *(self._publish(device_id, own) for device_id, own in by_device.items()),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _publish(self, device_id: str, messages: list[TelemetryMessage]) -> None:
        async with self._room:
            await self._publish_in_order(device_id, messages)

    async def _publish_in_order(self, device_id: str, messages: list[TelemetryMessage]) -> None:
        for message in messages:
            await self._bus.publish(
                store_subject(device_id),
                encode_message(message),
                key=device_id,
                msg_id=f"{STORE}-{message.msg_id}",
            )
