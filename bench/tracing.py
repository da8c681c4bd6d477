"""What tracing costs on the telemetry path, off and on (one core, no sockets).

Run: `.venv/bin/python bench/tracing.py` (about half a minute; `--help` for the knobs).
Prints a table and writes bench/results/tracing.json.

Two steps of every MQTT/HTTP upload, each timed per message, best of `--repeat`:

1. publish side: what the MQTT transport does per device batch: the `mqtt.publish`
   root span if tracing is on (`Tracing.root`, which samples), then
   `TelemetryIngest.submit_nowait` (builds the `TelemetryMessage`, its `bus.publish`
   span if traced, encodes, publishes) on a bus stub that completes at once;
2. consume side: `Pipeline.handle` on batches of `--batch` deliveries (decode,
   validate, `BatchWriter` group commit into a store that does nothing, latest values,
   ack).

Modes: tracing off (the default, `tracer=None`), and on with `sample_ratio` 0, 0.01
and 1 (an SDK tracer provider with no exporter, so the figure is the cost of making
spans, not of shipping them). Off is the mode with the hard budget: run this script
with `PYTHONPATH` pointing at an older checkout (one without tracing) to compare it
with the code before tracing existed; the modes with a tracer are skipped there.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import inspect
import json
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from iotmesh.bus.interface import Delivery, Publisher
from iotmesh.bus.memory import MemoryBus
from iotmesh.core.settings import BusSettings, WriterSettings
from iotmesh.core.types import TsRecord
from iotmesh.pipeline.ingest import TelemetryIngest
from iotmesh.pipeline.latest import LatestValues
from iotmesh.pipeline.service import Pipeline
from iotmesh.storage.timeseries import SeriesWrite
from iotmesh.storage.writer import BatchWriter

RESULTS = Path(__file__).parent / "results" / "tracing.json"
TRACING = "tracing" in inspect.signature(TelemetryIngest).parameters


class StubBus(Publisher):
    """Takes every message at once and keeps its bytes (for the consume side)."""

    def __init__(self) -> None:
        self.data: list[bytes] = []

    async def publish(
        self, subject: str, data: bytes, *, key: str, msg_id: str, timeout: float | None = None
    ) -> None:
        self.data.append(data)

    def publish_nowait(
        self,
        subject: str,
        data: bytes,
        *,
        key: str,
        msg_id: str,
        on_done: Callable[[BaseException | None], None],
    ) -> bool:
        self.data.append(data)
        on_done(None)
        return True


class NullStore:
    """A time-series store that commits instantly (only `write` is used)."""

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def write(self, batch: Sequence[SeriesWrite]) -> None:
        pass

    async def latest(self, entity_id: str, keys: Sequence[str] | None = None) -> dict[str, Any]:
        return {}


class BenchDelivery(Delivery):
    __slots__ = ("attempt", "data", "key", "msg_id", "state", "subject")

    def __init__(self, data: bytes, i: int) -> None:
        self.subject = "telemetry.dev"
        self.key = f"dev-{i % 100}"
        self.data = data
        self.msg_id = str(i)
        self.attempt = 1
        self.state = ""

    def ack(self) -> None:
        self.state = "ack"

    def nack(self, delay: float = 0.0) -> None:
        self.state = "nack"

    def term(self, reason: str = "") -> None:
        self.state = "term"

    @property
    def settled(self) -> bool:
        return bool(self.state)


def records(i: int) -> list[TsRecord]:
    return [TsRecord(1_700_000_000_000 + i, {"temperature": 20.5, "humidity": 40 + i % 50})]


def make_tracing(ratio: float | None) -> Any:
    """A `Tracing` as `iotmesh run` makes it (no exporter), or None for off."""
    if ratio is None:
        return None
    from iotmesh.core.settings import TracingSettings
    from iotmesh.core.tracing import Tracing, make_provider

    settings = TracingSettings(enabled=True, exporter="none")
    provider = make_provider(settings, service="bench", version="0", instance="bench")
    return Tracing(provider.get_tracer("bench"), ratio)


def publish_loop(tracing: Any, front: TelemetryIngest, prepared: list[list[TsRecord]]) -> None:
    done = [].append
    if tracing is None:  # what the MQTT transport does per device batch, tracing off
        for i, recs in enumerate(prepared):
            front.submit_nowait(f"dev-{i % 100}", recs, done)
        return
    from iotmesh.core.tracing import SpanKind, context_of

    for i, recs in enumerate(prepared):  # and tracing on (device_api._traced)
        device = f"dev-{i % 100}"
        if not tracing.sampled():
            front.submit_nowait(device, recs, done, None)  # type: ignore[call-arg,unused-ignore]
            continue
        span = tracing.start_root("mqtt.publish", SpanKind.SERVER, {"iotmesh.device_id": device})
        front.submit_nowait(device, recs, lambda error, s=span: s.end(), context_of(span))  # type: ignore[call-arg,misc,unused-ignore]


def bench_publish(tracing: Any, count: int, repeat: int) -> tuple[float, list[bytes]]:
    """Best µs per message of the publish side; and the bytes of the last run."""
    prepared = [records(i) for i in range(count)]
    best = float("inf")
    data: list[bytes] = []
    for _ in range(repeat):
        bus = StubBus()
        if tracing is None:
            front = TelemetryIngest(bus, None)
        else:
            front = TelemetryIngest(bus, None, tracing)  # type: ignore[call-arg,unused-ignore]
        gc.collect()
        start = time.perf_counter()
        publish_loop(tracing, front, prepared)
        best = min(best, time.perf_counter() - start)
        data = bus.data
    return best / count * 1e6, data


async def bench_consume(tracer: Any, data: list[bytes], batch: int, repeat: int) -> float:
    """Best µs per message of Pipeline.handle over batches of `batch`."""
    best = float("inf")
    for _ in range(repeat):
        if tracer is None:
            writer = BatchWriter(NullStore(), WriterSettings())  # type: ignore[arg-type]
        else:
            writer = BatchWriter(NullStore(), WriterSettings(), tracer)  # type: ignore[arg-type,call-arg,unused-ignore]
        await writer.start()
        bus = MemoryBus(BusSettings(partitions=1, partition_queue=1))  # handle() never uses it
        if tracer is None:
            pipeline = Pipeline(bus, writer, LatestValues())
        else:
            pipeline = Pipeline(bus, writer, LatestValues(), tracer=tracer)  # type: ignore[call-arg,unused-ignore]
        batches = [
            [BenchDelivery(d, i + j) for j, d in enumerate(data[i : i + batch])]
            for i in range(0, len(data), batch)
        ]
        gc.collect()
        start = time.perf_counter()
        for deliveries in batches:
            await pipeline.handle(deliveries)
        best = min(best, time.perf_counter() - start)
        await writer.stop()
        assert all(d.state == "ack" for b in batches for d in b)
    return best / len(data) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=50_000, help="messages per run")
    parser.add_argument("--batch", type=int, default=256, help="deliveries per handle()")
    parser.add_argument("--repeat", type=int, default=7, help="runs per figure (best kept)")
    args = parser.parse_args()

    modes: list[tuple[str, float | None]] = [("off", None)]
    if TRACING:
        modes += [("on, ratio 0", 0.0), ("on, ratio 0.01", 0.01), ("on, ratio 1", 1.0)]
    rows: dict[str, dict[str, float]] = {}
    for name, ratio in modes:
        tracing = make_tracing(ratio)
        tracer = None if tracing is None else tracing.tracer
        publish_us, data = bench_publish(tracing, args.count, args.repeat)
        consume_us = asyncio.run(bench_consume(tracer, data, args.batch, args.repeat))
        rows[name] = {"publish_us": publish_us, "consume_us": consume_us}

    table = Table(title=f"µs per message ({'with' if TRACING else 'without'} tracing code)")
    table.add_column("mode")
    table.add_column("publish (submit_nowait)", justify="right")
    table.add_column("consume (Pipeline.handle)", justify="right")
    for name, row in rows.items():
        table.add_row(name, f"{row['publish_us']:.2f}", f"{row['consume_us']:.2f}")
    Console().print(table)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "tracing_code": TRACING,
                "python": platform.python_version(),
                "args": vars(args),
                "us_per_message": rows,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
