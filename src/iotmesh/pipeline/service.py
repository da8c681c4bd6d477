"""The pipeline service: consumes telemetry from the bus and stores it.

Error handling: a message a processor drops is terminated on the bus (dead-lettered)
and its publisher gets an error; a failed store commit is retried by the writer, and
only if the writer gives up (it is stopping) are the messages nacked for redelivery.
A batch the store refuses as data (`PayloadError`, e.g. a timestamp InfluxDB cannot
hold) is written again message by message, so that only the refused messages are
terminated (with the store's reason) and the others are stored.
A sink that is full (`Overloaded`, e.g. the store hop's engine) is treated like a failed
store: the batch is nacked and comes back after a pause.
A message is acked only after its transaction committed (or, with a `BusSink`, after
the engine stored it on its way to the writer).

The same class is the `writer` service of `iotmesh serve`: it then consumes `store.>`
as group `writer`, without processors, into a `WriterSink` (see `sink.py`).

Tracing: with a tracer, each message that carries a `traceparent` gets a
`pipeline.handle` span (its child), ended when the message is settled, and the sink
is handed those spans' contexts (the writer hangs its `storage.commit` spans under
them). Without a tracer the batch costs one `is None` test more.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

from iotmesh.bus import subjects
from iotmesh.bus.interface import BusError, Delivery, Subscriber, Subscription
from iotmesh.core.errors import Overloaded, PayloadError, StorageError
from iotmesh.core.lifecycle import Service
from iotmesh.core.tracing import Span, SpanKind, Tracer, context_of, end, parent_from
from iotmesh.core.types import TelemetryMessage
from iotmesh.pipeline.latest import LatestCache
from iotmesh.pipeline.sink import Sink, WriterSink
from iotmesh.pipeline.stages import Drop, Processor, decode, make_validator
from iotmesh.storage.writer import BatchWriter

log = logging.getLogger(__name__)

GROUP = "pipeline"
YIELD_AFTER_S = 0.01  # longest stretch of processing without giving the loop a turn


class Pipeline(Service):
    """decode → validate → store (group commit) → latest values."""

    name = "pipeline"
    stats_counters = frozenset({"dropped"})

    def __init__(
        self,
        bus: Subscriber,
        writer: BatchWriter | Sink,
        latest: LatestCache,
        processors: Sequence[Processor] | None = None,
        tracer: Tracer | None = None,
        *,
        pattern: str = f"{subjects.TELEMETRY}.>",
        group: str = GROUP,
    ) -> None:
        """`writer`: a batch writer (store here) or another `Sink`; `pattern` and
        `group`: what to consume, as whom."""
        self._bus = bus
        self._sink: Sink = WriterSink(writer) if isinstance(writer, BatchWriter) else writer
        self._pattern = pattern
        self._group = group
        self._tracer = tracer
        self._latest = latest
        self._processors = list(processors) if processors is not None else [make_validator()]
        self._subscription: Subscription | None = None
        self.dropped = 0

    def stats(self) -> dict[str, Any]:
        return {"dropped": self.dropped}

    async def start(self) -> None:
        self._subscription = await self._bus.subscribe(self._pattern, self._group, self.handle)

    async def stop(self) -> None:
        if self._subscription is not None:
            await self._subscription.close()
            self._subscription = None

    def _process(self, delivery: Delivery) -> TelemetryMessage:
        message = decode(delivery.data)
        for processor in self._processors:
            message = processor(message)
        return message

    async def handle(self, deliveries: Sequence[Delivery]) -> None:
        """Process one batch from the bus; every delivery is settled on return."""
        accepted: list[tuple[Delivery, TelemetryMessage]] = []
        yield_at = time.perf_counter() + YIELD_AFTER_S
        for delivery in deliveries:
            try:
                accepted.append((delivery, self._process(delivery)))
            except Drop as drop:
                self.dropped += 1
                log.warning("dropped message %s: %s", delivery.msg_id, drop.reason)
                delivery.term(drop.reason)
            if time.perf_counter() > yield_at:
                # CPU-heavy processors: let the loop answer the engine (acks of
                # publishes, lease renewals) and the other partitions' batches.
                await asyncio.sleep(0)
                yield_at = time.perf_counter() + YIELD_AFTER_S
        if not accepted:
            return
        if self._tracer is not None:
            await self._handle_traced(self._tracer, accepted, len(deliveries))
        else:
            await self._store(accepted, None)

    async def _store(
        self, accepted: list[tuple[Delivery, TelemetryMessage]], spans: list[Span] | None
    ) -> None:
        try:
            await self._sink.put(
                [message for _, message in accepted],
                traces=None if spans is None else [context_of(s) for s in spans],
            )
        except PayloadError:
            await self._write_each(accepted)
            return
        except (StorageError, BusError, Overloaded) as exc:
            log.warning("store failed, %d messages will be redelivered: %s", len(accepted), exc)
            for delivery, _ in accepted:
                delivery.nack(delay=1.0)
            return
        await self._latest.update(message for _, message in accepted)
        for delivery, _ in accepted:
            delivery.ack()

    async def _handle_traced(
        self, tracer: Tracer, accepted: list[tuple[Delivery, TelemetryMessage]], size: int
    ) -> None:
        spans = [
            tracer.start_span(
                "pipeline.handle",
                context=parent_from(message.trace),
                kind=SpanKind.CONSUMER,
                attributes={
                    "messaging.message.id": message.msg_id,
                    "messaging.batch.message_count": size,
                    "iotmesh.device_id": message.device_id,
                    "iotmesh.delivery.attempt": delivery.attempt,
                },
            )
            for delivery, message in accepted
            if message.trace is not None
        ]
        error: BaseException | None = None
        try:
            await self._store(accepted, spans or None)
        except BaseException as exc:
            error = exc
            raise
        finally:
            for span in spans:
                end(span, error)

    async def _write_each(self, accepted: list[tuple[Delivery, TelemetryMessage]]) -> None:
        """Write messages one by one (in order): terminate those the store refuses."""
        for i, (delivery, message) in enumerate(accepted):
            try:
                await self._sink.put([message])
            except PayloadError as exc:
                self.dropped += 1
                log.warning("store refused message %s: %s", delivery.msg_id, exc)
                delivery.term(str(exc))
                continue
            except (StorageError, BusError, Overloaded) as exc:
                log.warning(
                    "store failed, %d messages will be redelivered: %s", len(accepted) - i, exc
                )
                for later, _ in accepted[i:]:
                    later.nack(delay=1.0)
                return
            await self._latest.update([message])
            delivery.ack()
