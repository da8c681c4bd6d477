"""Tracing off costs nothing on the wire; on, sampling decides at the root."""

from __future__ import annotations

from collections.abc import Callable

import msgspec
import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from iotmesh.bus.interface import Publisher
from iotmesh.core.errors import ConfigError
from iotmesh.core.settings import TracingSettings
from iotmesh.core.tracing import (
    SpanKind,
    Tracing,
    context_of,
    make_provider,
    parent_from,
    recording,
    traceparent,
)
from iotmesh.core.types import TelemetryMessage, TsRecord
from iotmesh.pipeline.ingest import TelemetryIngest
from iotmesh.pipeline.stages import decode

RECORDS = [TsRecord(1, {"t": 1})]


class CapturingBus(Publisher):
    """Keeps what is published; every publish is done at once."""

    def __init__(self) -> None:
        self.published: list[bytes] = []

    async def publish(
        self, subject: str, data: bytes, *, key: str, msg_id: str, timeout: float | None = None
    ) -> None:
        self.published.append(data)

    def publish_nowait(
        self,
        subject: str,
        data: bytes,
        *,
        key: str,
        msg_id: str,
        on_done: Callable[[BaseException | None], None],
    ) -> bool:
        self.published.append(data)
        on_done(None)
        return True


def tracing_with(ratio: float) -> tuple[Tracing, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = make_provider(
        TracingSettings(enabled=True, exporter="none"), service="s", version="1", instance="i"
    )
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return Tracing(provider.get_tracer("test"), ratio), exporter


async def test_without_a_tracer_the_message_carries_no_trace_field() -> None:
    bus = CapturingBus()
    ingest = TelemetryIngest(bus, None)
    await ingest.submit("dev-1", RECORDS)
    assert ingest.submit_nowait("dev-1", RECORDS, lambda error: None)
    for data in bus.published:
        assert "trace" not in msgspec.msgpack.decode(data)  # not even as nil
        assert decode(data).trace is None


async def test_a_sampled_upload_carries_its_bus_publish_span_as_traceparent() -> None:
    tracing, exporter = tracing_with(1.0)
    bus = CapturingBus()
    ingest = TelemetryIngest(bus, None, tracing)
    root = tracing.start_root("transport", SpanKind.SERVER, {})
    await ingest.submit("dev-1", RECORDS, context_of(root))
    root.end()
    span, _ = exporter.get_finished_spans()
    assert span.name == "bus.publish"
    assert span.context is not None
    assert span.parent is not None
    assert span.parent.span_id == root.get_span_context().span_id
    trace = decode(bus.published[0]).trace
    assert trace is not None
    version, trace_id, span_id, flags = trace.split("-")
    assert (version, trace_id, span_id) == (
        "00",
        f"{span.context.trace_id:032x}",
        f"{span.context.span_id:016x}",
    )
    assert int(flags, 16) & 1  # sampled


async def test_an_unsampled_upload_carries_nothing_and_exports_nothing() -> None:
    tracing, exporter = tracing_with(0.0)
    assert not tracing.sampled()
    bus = CapturingBus()
    ingest = TelemetryIngest(bus, None, tracing)
    await ingest.submit("dev-1", RECORDS)  # no transport span: not sampled there
    done: list[BaseException | None] = []
    assert ingest.submit_nowait("dev-1", RECORDS, done.append, None)
    assert done == [None]
    assert [decode(data).trace for data in bus.published] == [None, None]
    assert exporter.get_finished_spans() == ()


def test_roots_are_sampled_by_the_ratio() -> None:
    tracing, _ = tracing_with(0.25)
    sampled = sum(tracing.sampled() for _ in range(4000))
    assert 700 < sampled < 1300  # 1000 expected; 300 either side is ~10 sigma
    assert recording(context_of(tracing.start_root("transport", SpanKind.SERVER, {})))


@pytest.mark.parametrize(("flags", "traced"), [("01", True), ("00", False)])
def test_an_incoming_traceparent_decides_whatever_the_ratio(flags: str, traced: bool) -> None:
    tracing, _ = tracing_with(0.0)
    parent = parent_from(f"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-{flags}")
    span = tracing.tracer.start_span("child", context=parent)
    assert (traceparent(span) is not None) is traced
    assert span.get_span_context().trace_id == 0x0AF7651916CD43DD8448EB211C80319C


@pytest.mark.parametrize("value", ["", "garbage", "00-0-0-01", "ff-" + "0" * 32 + "-" + "0" * 16])
def test_a_bad_traceparent_starts_a_new_trace(value: str) -> None:
    tracing, _ = tracing_with(1.0)
    span = tracing.tracer.start_span("child", context=parent_from(value))
    assert span.parent is None  # type: ignore[attr-defined]


def test_old_messages_without_the_field_still_decode() -> None:
    old = msgspec.msgpack.encode(
        {"msg_id": "m", "device_id": "d", "received_ts": 1, "records": [[1, {"t": 1}]]}
    )
    assert decode(old) == TelemetryMessage("m", "d", 1, [TsRecord(1, {"t": 1})])


@pytest.mark.parametrize("exporter", ["none", "console", "otlp"])
def test_providers_for_each_exporter(exporter: str) -> None:
    settings = TracingSettings(enabled=True, exporter=exporter)  # type: ignore[arg-type]
    provider = make_provider(settings, service="iotmesh", version="1", instance="i-1")
    try:
        resource = provider.resource.attributes
        assert resource["service.name"] == "iotmesh"
        assert resource["service.instance.id"] == "i-1"
    finally:
        provider.shutdown()


def test_otlp_without_the_exporter_installed_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.http.trace_exporter", None)
    with pytest.raises(ConfigError, match=r"iotmesh\[otel\]"):
        make_provider(TracingSettings(enabled=True), service="s", version="1", instance="i")


async def test_a_stop_waits_for_a_stuck_collector_only_so_long() -> None:
    import threading
    from collections.abc import Sequence

    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )

    from iotmesh.core.tracing import shutdown

    release = threading.Event()

    class StuckExporter(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            release.wait(10)
            return SpanExportResult.SUCCESS

    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(BatchSpanProcessor(StuckExporter()))
    provider.get_tracer("test").start_span("s").end()
    try:
        assert await shutdown(provider, 0.2) is False
    finally:
        release.set()
