"""OpenTelemetry tracing of device messages; off unless `tracing.enabled`.

One telemetry message makes this trace (names are the span names):

    mqtt.publish | http.telemetry     the transport took the upload (SERVER)
    └── bus.publish                   handed to the bus (PRODUCER); its W3C
        │                             `traceparent` travels in `TelemetryMessage.trace`
        └── pipeline.handle           the consumer's work on this message (CONSUMER),
            │                         from decode to ack
            └── storage.commit        the group commit that made it durable

A commit holds many messages, most of them not traced. The writer makes one
`storage.commit` span per *traced* message in it, a child of that message's
`pipeline.handle`, all with the commit's start and end and the same
`iotmesh.commit.seq`: every trace then ends in its own commit span (a viewer shows the
whole path of one message), and the spans of one commit can still be found together.
Links from one commit span to every message would be cheaper but most trace viewers
hardly show links.

Cost (the MQTT QoS 1 path moves ~80k msg/s): every component holds a `Tracing` or
`Tracer` that is None when tracing is off, and checks it once per bus message or
batch; no span, context or contextvar is touched then, and `TelemetryMessage.trace`
stays None, which msgspec leaves out of the encoding. When on, the transport (the
root of the trace) decides with one `random()` whether a message is traced
(`Tracing.sampled`), *before* any span exists: an SDK sampler decides only after
making ids and a span object, which measured ~10 µs per message for nothing.
An unsampled message gets no span and no `traceparent`, so the bus, pipeline and
writer do nothing more for it. A message that arrives with a `traceparent` (HTTP
header) follows its sampled flag instead, whatever the ratio.
"""

from __future__ import annotations

import asyncio
import random
import sys
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Tracer, use_span
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

from iotmesh.core.errors import ConfigError

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

    from iotmesh.core.settings import TracingSettings

Context = otel_context.Context

__all__ = [
    "INSTRUMENTATION",
    "AttributeValue",
    "Context",
    "Span",
    "SpanKind",
    "Tracer",
    "Tracing",
    "context_of",
    "end",
    "make_provider",
    "parent_from",
    "recording",
    "shutdown",
    "traceparent",
    "use_span",
]

INSTRUMENTATION = "iotmesh"

_propagator = TraceContextTextMapPropagator()


def make_provider(
    settings: TracingSettings, *, service: str, version: str, instance: str
) -> TracerProvider:
    """The SDK tracer provider `settings` describe, with its exporter attached.

    Call `shutdown()` on it at exit: it flushes the spans still batched.

    Raises:
        ConfigError: `exporter = "otlp"` and the OTLP exporter is not installed.
    """
    # The SDK is imported only when tracing is on: a process without it starts faster.
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased

    resource = Resource.create(
        {"service.name": service, "service.version": version, "service.instance.id": instance}
    )
    # Roots are sampled by `Tracing.root` before a span is made; a span that is made
    # is kept, and a child follows its parent's flag.
    # Shut down by its owner (`shutdown`, bounded), not at interpreter exit, where a
    # collector that does not answer would hold the process.
    provider = TracerProvider(
        resource=resource, sampler=ParentBased(ALWAYS_ON), shutdown_on_exit=False
    )
    if settings.exporter == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            raise ConfigError(
                "tracing.exporter = otlp needs the OTLP exporter: pip install 'iotmesh[otel]'"
            ) from None
        exporter = OTLPSpanExporter(settings.endpoint, timeout=settings.export_timeout_s)
        provider.add_span_processor(BatchSpanProcessor(exporter))
    elif settings.exporter == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter(out=sys.stderr)))
    return provider


_NO_PARENT = otel_context.Context()


class Tracing:
    """A tracer and the share of device messages it traces (`tracing.sample_ratio`)."""

    def __init__(self, tracer: Tracer, sample_ratio: float = 1.0) -> None:
        self.tracer = tracer
        self.sample_ratio = sample_ratio

    def sampled(self) -> bool:
        """Whether to trace the next message (if no, nothing is made for it)."""
        return self.sample_ratio >= 1.0 or random.random() < self.sample_ratio

    def start_root(
        self, name: str, kind: SpanKind, attributes: Mapping[str, AttributeValue]
    ) -> Span:
        """Start the root span of a sampled message's trace (a new trace id)."""
        return self.tracer.start_span(name, context=_NO_PARENT, kind=kind, attributes=attributes)


async def shutdown(provider: TracerProvider, timeout: float) -> bool:
    """Flush and close `provider`, waiting at most `timeout` seconds; False if it did not
    finish (a collector that does not answer: the rest of its spans are dropped).

    The SDK's shutdown blocks (it exports what is batched), so it runs in a daemon
    thread of its own that a stop does not wait for beyond `timeout`."""
    done = threading.Event()

    def run() -> None:
        try:
            provider.shutdown()
        finally:
            done.set()

    threading.Thread(target=run, name="tracing-shutdown", daemon=True).start()
    return await asyncio.to_thread(done.wait, timeout)


def traceparent(span: Span) -> str | None:
    """The W3C `traceparent` of a span that is being recorded, else None (not sampled:
    nothing downstream should trace the message)."""
    if not span.is_recording():
        return None
    carrier: dict[str, str] = {}
    _propagator.inject(carrier, trace.set_span_in_context(span))
    return carrier.get("traceparent")


def parent_from(value: str) -> otel_context.Context:
    """The context to start a child span in, from a `traceparent` (an HTTP header, a bus
    message). An invalid value gives a context without a parent: a new trace."""
    return _propagator.extract({"traceparent": value})


def context_of(span: Span) -> otel_context.Context:
    """A context whose current span is `span`: the parent of spans started in it."""
    return trace.set_span_in_context(span)


def end(span: Span, error: BaseException | None = None) -> None:
    """End a span, marking it failed with `error` if there is one."""
    if error is not None:
        span.record_exception(error)
        span.set_status(trace.Status(trace.StatusCode.ERROR, str(error)))
    span.end()


def recording(parent: otel_context.Context | None) -> bool:
    """Whether the span of `parent` (None: the current context) is being recorded: a
    child of it is to be traced."""
    return trace.get_current_span(parent).is_recording()
