"""The front door of the pipeline: transports hand authenticated uploads to the bus.

Every transport (HTTP, MQTT, CoAP) calls `TelemetryIngest.submit` with the device and
its parsed records. It returns once the bus guarantees delivery, which in the
all-in-one process means the records are committed: a transport acknowledges its
device after `submit` returns and never before.

Per-device order. A transport submits each message when it is parsed, without waiting
for the previous one, so a device's uploads overlap on the bus. A durable engine that is
full refuses a publish and the publisher retries it (bus/nats.py, redis_streams.py);
meanwhile a later message of the same device may be accepted first. So a device's
`submit`s publish one at a time, in call order: each waits until the one before it is
stored (success or not). Different devices still publish concurrently. `submit_nowait`
declines while a device has a `submit` pending, so it cannot overtake one either.

Tracing (core/tracing.py): when on, an upload whose transport hands the context of a
recorded span (`parent`: the message was sampled) gets a `bus.publish` span, a child
of it, and its `traceparent` rides in the message. No parent: not traced, and no
context is looked up. When off the path is the same as ever but for one `is None`
test per upload. The span starts when the publish does (after any wait behind the
device's earlier uploads).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from typing import TYPE_CHECKING

from iotmesh.bus import subjects
from iotmesh.bus.interface import Publisher
from iotmesh.core.clock import now_ms
from iotmesh.core.errors import Overloaded
from iotmesh.core.ids import new_id
from iotmesh.core.tracing import Span, SpanKind, Tracer, Tracing, end, recording, traceparent
from iotmesh.core.types import TelemetryMessage, TsRecord
from iotmesh.pipeline.stages import encode_message

if TYPE_CHECKING:
    from opentelemetry.context import Context


class TelemetryIngest:
    """Publishes device telemetry to the bus."""

    def __init__(
        self, bus: Publisher, enqueue_timeout_s: float | None, tracing: Tracing | None = None
    ) -> None:
        self._bus = bus
        self._timeout = enqueue_timeout_s
        self.tracing = tracing  # transports start their root spans with it; None: off
        # Message ids: unique per process start and message, far cheaper than a uuid4
        # per message on the hot path.
        self._prefix = new_id()
        self._counter = itertools.count()
        # device id -> done when the device's newest pending submit has finished.
        self._tails: dict[str, asyncio.Future[None]] = {}

    def _message(self, device_id: str, records: list[TsRecord]) -> TelemetryMessage:
        return TelemetryMessage(
            msg_id=f"{self._prefix}-{next(self._counter)}",
            device_id=device_id,
            received_ts=now_ms(),
            records=records,
        )

    @staticmethod
    def _span(tracer: Tracer, message: TelemetryMessage, parent: Context) -> Span | None:
        if not recording(parent):
            return None  # not sampled at the transport: not traced
        span = tracer.start_span(
            "bus.publish",
            context=parent,
            kind=SpanKind.PRODUCER,
            attributes={
                "messaging.destination.name": subjects.telemetry_subject(message.device_id),
                "messaging.message.id": message.msg_id,
                "iotmesh.device_id": message.device_id,
                "iotmesh.records": len(message.records),
            },
        )
        message.trace = traceparent(span)
        return span

    def submit_nowait(
        self,
        device_id: str,
        records: list[TsRecord],
        on_done: Callable[[BaseException | None], None],
        parent: Context | None = None,
    ) -> bool:
        """Publish one upload if the bus takes it at once; `on_done` is then called once,
        with None when it is durable or the error `submit` would raise. False: use
        `submit` (nothing was published).

        `parent`: the transport's span context when the message is traced; None (the
        only case when tracing is off) costs one test."""
        if device_id in self._tails:
            return False  # a submit of this device is pending: keep behind it
        message = self._message(device_id, records)
        if parent is not None and self.tracing is not None:
            return self._submit_nowait_traced(self.tracing.tracer, message, on_done, parent)
        return self._bus.publish_nowait(
            subjects.telemetry_subject(device_id),
            encode_message(message),
            key=device_id,
            msg_id=message.msg_id,
            on_done=on_done,
        )

    def _submit_nowait_traced(
        self,
        tracer: Tracer,
        message: TelemetryMessage,
        on_done: Callable[[BaseException | None], None],
        parent: Context,
    ) -> bool:
        span = self._span(tracer, message, parent)
        if span is None:
            done = on_done
        else:

            def done(error: BaseException | None) -> None:
                end(span, error)
                on_done(error)

        # Not taken: the span is never ended, so never exported; `submit` makes another.
        return self._bus.publish_nowait(
            subjects.telemetry_subject(message.device_id),
            encode_message(message),
            key=message.device_id,
            msg_id=message.msg_id,
            on_done=done,
        )

    async def submit(
        self, device_id: str, records: list[TsRecord], parent: Context | None = None
    ) -> None:
        """Publish one upload; return when it is durable.

        `parent`: the transport's span context, when tracing and the message is sampled.

        Raises:
            Overloaded: no room on the bus (or the device's earlier submits still wait)
                within the enqueue timeout; nothing was kept.
            BusError: the pipeline gave the message up.
        """
        message = self._message(device_id, records)
        before = self._tails.get(device_id)
        loop = asyncio.get_running_loop()
        mine: asyncio.Future[None] = loop.create_future()
        self._tails[device_id] = mine
        try:
            timeout = self._timeout
            if before is not None:
                # Its outcome is its caller's, not ours. The enqueue timeout covers this
                # wait too: a device flooding one transport gets "retry later" in time.
                started = loop.time()
                await asyncio.wait([before], timeout=timeout)
                if not before.done():
                    raise Overloaded("the device's earlier uploads are still queued; retry later")
                if timeout is not None:
                    timeout = max(timeout - (loop.time() - started), 0.001)
            await self._publish(message, timeout, parent)
        finally:
            if before is not None and not before.done():
                # Cancelled while waiting: the next may go once `before` is done.
                before.add_done_callback(lambda _: self._finished(device_id, mine))
            else:
                self._finished(device_id, mine)

    def _finished(self, device_id: str, done: asyncio.Future[None]) -> None:
        if not done.done():
            done.set_result(None)
        if self._tails.get(device_id) is done:
            del self._tails[device_id]

    async def _publish(
        self, message: TelemetryMessage, timeout: float | None, parent: Context | None
    ) -> None:
        tracing = self.tracing
        span = None
        if parent is not None and tracing is not None:
            span = self._span(tracing.tracer, message, parent)
        try:
            await self._bus.publish(
                subjects.telemetry_subject(message.device_id),
                encode_message(message),
                key=message.device_id,
                msg_id=message.msg_id,
                timeout=timeout,
            )
        except BaseException as exc:
            if span is not None:
                end(span, exc)
            raise
        if span is not None:
            span.end()
