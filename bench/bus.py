"""Benchmark of the bus implementations: publish latency and throughput through one group.

Run: `.venv/bin/python bench/bus.py` (NATS with JetStream on 127.0.0.1:4222 and Redis on
127.0.0.1:6379, as scripts/test starts them; `--help` for the knobs). Prints a table and
writes bench/results/bus.json.

For each backend: one consumer group ("pipeline", one member) that acks every batch at
once; `--publishers` tasks publish `--messages` messages in total over `--devices` keys
(100-byte payloads), each awaiting its publish before the next, as transports do. The
in-process publish completes when the group acked; an engine's when it stored the
message. Reported: publish latency percentiles, messages per second published, and the
time until the group acked the last one. Each backend runs in a fresh namespace, deleted
afterwards; a run stops after `--max-seconds` whatever the count.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from iotmesh.bus import make_bus
from iotmesh.bus.interface import Delivery
from iotmesh.core.settings import BusSettings

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import write_host_results
from storage import python_loop_ns

RESULTS = Path(__file__).parent / "results" / "bus.json"


async def run(backend: str, args: argparse.Namespace) -> dict[str, Any]:
    settings = BusSettings(
        backend=backend,  # type: ignore[arg-type]
        namespace=f"bench{uuid.uuid4().hex[:8]}",
        partitions=args.partitions,
        partition_queue=args.partition_queue,
        redis_url="redis://127.0.0.1:6379/15",
    )
    bus: Any = make_bus(settings)
    await bus.start()
    acked = 0
    all_acked = asyncio.Event()
    latencies: list[float] = []
    counter = itertools.count()
    payload = b"x" * 100
    deadline = time.perf_counter() + args.max_seconds

    async def handler(deliveries: Sequence[Delivery]) -> None:
        nonlocal acked
        for d in deliveries:
            d.ack()
        acked += len(deliveries)
        if acked >= published_target:
            all_acked.set()

    async def publisher() -> None:
        while (n := next(counter)) < args.messages and time.perf_counter() < deadline:
            key = f"dev-{n % args.devices}"
            started = time.perf_counter()
            await bus.publish(f"telemetry.{key}", payload, key=key, msg_id=f"m{n}")
            latencies.append(time.perf_counter() - started)

    published_target = args.messages
    try:
        await bus.subscribe("telemetry.>", "pipeline", handler)
        started = time.perf_counter()
        await asyncio.gather(*(publisher() for _ in range(args.publishers)))
        published_s = time.perf_counter() - started
        published_target = len(latencies)
        if acked >= published_target:
            all_acked.set()
        async with asyncio.timeout(args.max_seconds):
            await all_acked.wait()
        consumed_s = time.perf_counter() - started
    finally:
        await bus.stop()
        if backend != "memory":
            cleaner: Any = make_bus(settings)
            await cleaner.start()
            await cleaner.delete_everything()
            await cleaner.stop()
    q = statistics.quantiles(latencies, n=100)
    return {
        "backend": backend,
        "messages": len(latencies),
        "publish_per_s": len(latencies) / published_s,
        "consumed_per_s": len(latencies) / consumed_s,
        "p50_ms": q[49] * 1000,
        "p99_ms": q[98] * 1000,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="memory,nats,redis")
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--publishers", type=int, default=64)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--partition-queue", type=int, default=4096)
    parser.add_argument("--max-seconds", type=float, default=120.0)
    args = parser.parse_args()
    loop_ns_before = python_loop_ns()
    results = [await run(b, args) for b in args.backends.split(",")]
    loop_ns_after = python_loop_ns()

    table = Table(title=f"bus: {args.messages} messages, {args.publishers} publishers")
    for column in ("backend", "messages", "publish/s", "consumed/s", "p50 ms", "p99 ms"):
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(
            r["backend"],
            str(r["messages"]),
            f"{r['publish_per_s']:,.0f}",
            f"{r['consumed_per_s']:,.0f}",
            f"{r['p50_ms']:.2f}",
            f"{r['p99_ms']:.2f}",
        )
    Console().print(table)
    write_host_results(RESULTS, args, (loop_ns_before, loop_ns_after), results)


if __name__ == "__main__":
    asyncio.run(main())
