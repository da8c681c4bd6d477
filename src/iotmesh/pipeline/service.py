"""The pipeline service: consumes telemetry from the bus and stores it.

Error handling: a message a processor drops is terminated on the bus (dead-lettered)
and its publisher gets an error; a failed store commit is retried by the writer, and
only if the writer gives up (it is stopping) are the messages nacked for redelivery.
A batch the store refuses as data (`PayloadError`, e.g. a timestamp InfluxDB cannot
hold) is written again message by message, so that only the refused messages are
terminated (with the store's reason) and the others are stored.
A message is acked only after its transaction committed.

Tracing: with a tracer, each message that carries a `traceparent` gets a
`pipeline.handle` span (its child), ended when the message is settled, and the writer
is handed those spans' contexts to hang its `storage.commit` spans under. Without a
tracer the batch costs one `is None` test more.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from iotmesh.bus import subjects
from iotmesh.bus.interface import Delivery, Subscriber, Subscription
from iotmesh.core.errors import PayloadError, StorageError
from iotmesh.core.lifecycle import Service
from iotmesh.core.tracing import Span, SpanKind, Tracer, context_of, end, parent_from
from iotmesh.core.types import TelemetryMessage
from iotmesh.pipeline.latest import LatestCache
from iotmesh.pipeline.stages import Drop, Processor, decode, make_validator
from iotmesh.storage.timeseries import SeriesWrite
from iotmesh.storage.writer import BatchWriter

log = logging.getLogger(__name__)

GROUP = "pipeline"


class Pipeline(Service):
    """decode → validate → store (group commit) → latest values."""

    name = "pipeline"
    stats_counters = frozenset({"dropped"})

    def __init__(
        self,
        bus: Subscriber,
        writer: BatchWriter,
        latest: LatestCache,
        processors: Sequence[Processor] | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        self._bus = bus
        self._tracer = tracer
        self._writer = writer
        self._latest = latest
        self._processors = list(processors) if processors is not None else [make_validator()]
        self._subscription: Subscription | None = None
        self.dropped = 0

    def stats(self) -> dict[str, Any]:
        return {"dropped": self.dropped}

    async def start(self) -> None:
        self._subscription = await self._bus.subscribe(
            f"{subjects.TELEMETRY}.>", GROUP, self.handle
        )

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
        for delivery in deliveries:
            try:
                accepted.append((delivery, self._process(delivery)))
            except Drop as drop:
                self.dropped += 1
                log.warning("dropped message %s: %s", delivery.msg_id, drop.reason)
                delivery.term(drop.reason)
        if not accepted:
            return
        if self._tracer is not None:
            await self._handle_traced(self._tracer, accepted, len(deliveries))
        else:
            await self._store(accepted, None)

    async def _store(
        self, accepted: list[tuple[Delivery, TelemetryMessage]], spans: list[Span] | None
    ) -> None:
        batch = [SeriesWrite(message.device_id, message.records) for _, message in accepted]
        try:
            await self._writer.write(
                batch, traces=None if spans is None else [context_of(s) for s in spans]
            )
        except PayloadError:
            await self._write_each(accepted)
            return
        except StorageError as exc:
            log.warning("store failed, %d messages will be redelivered: %s", len(batch), exc)
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
                await self._writer.write([SeriesWrite(message.device_id, message.records)])
            except PayloadError as exc:
                self.dropped += 1
                log.warning("store refused message %s: %s", delivery.msg_id, exc)
                delivery.term(str(exc))
                continue
            except StorageError as exc:
                log.warning(
                    "store failed, %d messages will be redelivered: %s", len(accepted) - i, exc
                )
                for later, _ in accepted[i:]:
                    later.nack(delay=1.0)
                return
            await self._latest.update([message])
            delivery.ack()
