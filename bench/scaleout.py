"""Scale-out of `iotmesh serve`: 1 vs 2 pipeline workers, 1 vs 2 MQTT transports, and
the latency the engine bus adds compared with the in-process one, in one run.

Run: `.venv/bin/python bench/scaleout.py` (NATS with JetStream on 127.0.0.1:4222, Redis
on 127.0.0.1:6379, as scripts/test starts them; `--help` for the knobs). Prints a table
and writes bench/results/scaleout.json.

(a) pipeline workers: state, writer, N pipeline workers, 1 mqtt and 1 http as separate
    processes on `--backend`; every record costs `--cpu-work-us` of CPU in the pipeline
    (`pipeline.cpu_work_us`, standing in for heavy rules), so the pipeline, not the
    store or the transport, is the bottleneck. Every device first publishes
    `--backlog` QoS 1 messages (at most `--window` unacknowledged), faster than the
    workers take them, so the engine holds a backlog; then, with the load generator
    idle (on 2 cores it would take the workers' CPU), the writer's committed records
    are counted for `--measure-s` after `--warmup-s` (its /stats). Pipeline batches
    are `--pipeline-batch` messages, so one batch of CPU-heavy work does not hold a
    worker for seconds.
(b) transports: the same with N mqtt transports, 2 pipeline workers, no extra CPU
    work and no rate limit (closed loop); the figure is the PUBACK rate (a PUBACK =
    the engine stored the message).
(c) bus hop: one process publishes one message at a time (every `--hop-interval-ms`)
    and a group member of the same process consumes it; the time from the publish
    call to the handler, for the in-process, NATS and Redis buses.

Everything runs on one machine: processes, engines and the load generator share its
cores, so (a) and (b) say how far one machine goes, not how a cluster scales. Each
case runs in a fresh data dir and bus namespace, deleted afterwards; every phase is
bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import psutil
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tests.integration import cluster  # noqa: E402

from _measure import machine  # noqa: E402
from iotmesh.bus import make_bus  # noqa: E402
from iotmesh.bus.interface import Delivery  # noqa: E402
from iotmesh.core.settings import BusSettings  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "scaleout.json"


def _stats(instance: cluster.Instance) -> dict[str, Any]:
    r = httpx.get(instance.info["health"]["url"] + "/stats", timeout=10)
    r.raise_for_status()
    body: dict[str, Any] = r.json()
    return body


async def _publish_while(
    loads: list[cluster.DeviceLoad],
    window: int,
    interval_s: float,
    measure: Callable[[], Awaitable[None]],
) -> None:
    """Keep every device publishing while `measure` runs."""
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(
            cluster.publish(load, 10**9, window, stop, interval_s), name=f"load-{i}"
        )
        for i, load in enumerate(loads)
    ]
    try:
        await measure()
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _preload(loads: list[cluster.DeviceLoad], messages: int, window: int) -> None:
    """Every device publishes `messages` messages (the engine stores what the workers
    have not taken yet)."""
    stop = asyncio.Event()
    await asyncio.gather(*(cluster.publish(load, messages, window, stop) for load in loads))


def throughput(
    args: argparse.Namespace, pipelines: int, transports: int, cpu_us: float, backlog: int
) -> dict[str, Any]:
    """Committed records/s and PUBACKs/s of one layout. `backlog` > 0: every device
    first publishes that many messages, then the committed rate is measured while the
    engine feeds the workers from the backlog (no load generator running); 0: the
    devices publish (closed loop) while it is measured."""
    env = cluster.bus_env(
        args.backend,
        IOTMESH_PIPELINE__CPU_WORK_US=str(cpu_us),
        IOTMESH_BUS__MAX_BATCH=str(args.pipeline_batch if cpu_us else 512),
        IOTMESH_BUS__PARTITION_QUEUE=str(max(1024, backlog * args.devices // 4)),
        IOTMESH_STORAGE__SQLITE__SYNCHRONOUS="NORMAL",
        IOTMESH_LOG_LEVEL="warning",
        # Members rebalance partitions every ack_wait_s / 3: 1 s, so that a second
        # worker has its share well within the warm-up (30 s default: up to 20 s).
        IOTMESH_BUS__ACK_WAIT_S="3",
    )
    with tempfile.TemporaryDirectory(prefix="scaleout-") as tmp:
        data_dir, logs = Path(tmp) / "data", Path(tmp) / "logs"
        instances = cluster.start([("state", "1")], data_dir, logs, env)
        try:
            roles = [("writer", "1"), ("http", "1")]
            roles += [("pipeline", str(i)) for i in range(pipelines)]
            roles += [("mqtt", str(i)) for i in range(transports)]
            instances += cluster.start(roles, data_dir, logs, env)
            writer, http = instances[1], instances[2]
            ports = [i.mqtt_port for i in instances if i.role == "mqtt"]
            with cluster.admin_client(data_dir, http.url) as admin:
                devices = cluster.create_devices(admin, args.devices, f"s{uuid.uuid4().hex[:6]}")
            loads = [
                cluster.DeviceLoad(d["access_token"], [ports[i % len(ports)]])
                for i, d in enumerate(devices)
            ]
            figures: dict[str, Any] = {}

            workers = [psutil.Process(i.pid) for i in instances if i.role == "pipeline"]

            def cpu_s() -> list[float]:
                return [sum(p.cpu_times()[:2]) for p in workers]

            async def measure() -> None:
                await asyncio.sleep(args.warmup_s)
                records0 = _stats(writer)["writer"]["records"]
                acked0 = sum(len(x.acked) for x in loads)
                cpu0, machine0 = cpu_s(), psutil.cpu_times()
                t0 = time.perf_counter()
                await asyncio.sleep(args.measure_s)
                elapsed = time.perf_counter() - t0
                records1 = _stats(writer)["writer"]["records"]
                acked1 = sum(len(x.acked) for x in loads)
                cpu1, machine1 = cpu_s(), psutil.cpu_times()
                figures["committed_per_s"] = (records1 - records0) / elapsed
                figures["acked_per_s"] = (acked1 - acked0) / elapsed
                figures["worker_cpu_pct"] = [
                    round(100 * (b - a) / elapsed, 1) for a, b in zip(cpu0, cpu1, strict=True)
                ]
                busy = (machine1.user + machine1.system) - (machine0.user + machine0.system)
                idle = machine1.idle - machine0.idle
                figures["machine_busy_pct"] = round(100 * busy / (busy + idle), 1)

            if backlog:
                asyncio.run(_preload(loads, backlog, args.window))
                asyncio.run(measure())
            else:
                asyncio.run(_publish_while(loads, args.window, 0.0, measure))
            return {
                "pipelines": pipelines,
                "transports": transports,
                "cpu_work_us": cpu_us,
                "backlog_per_device": backlog or None,
                **figures,
            }
        finally:
            for instance in reversed(instances):
                instance.stop()
            asyncio.run(cluster.delete_bus_data(env))


async def hop_latency(backend: str, args: argparse.Namespace) -> dict[str, Any]:
    """Publish call -> consumer handler, one message in flight at a time."""
    settings = BusSettings(
        backend=backend,  # type: ignore[arg-type]
        namespace=f"hop{uuid.uuid4().hex[:8]}",
        nats_url=cluster.NATS_URL,
        redis_url=cluster.REDIS_URL,
    )
    bus: Any = make_bus(settings)
    await bus.start()
    received: dict[str, float] = {}
    arrived = asyncio.Event()

    async def handler(deliveries: Sequence[Delivery]) -> None:
        now = time.perf_counter()
        for d in deliveries:
            received[d.msg_id] = now
            d.ack()
        arrived.set()

    latencies: list[float] = []
    try:
        await bus.subscribe("telemetry.>", "pipeline", handler)
        for n in range(args.hop_messages):
            arrived.clear()
            msg_id = f"h{n}"
            key = f"dev-{n % 100}"
            started = time.perf_counter()
            publish = asyncio.create_task(
                bus.publish(f"telemetry.{key}", b"x" * 100, key=key, msg_id=msg_id)
            )
            async with asyncio.timeout(10):
                while msg_id not in received:
                    await arrived.wait()
                    arrived.clear()
                await publish
            if n >= 10:  # the first ones warm connections and caches up
                latencies.append(received[msg_id] - started)
            await asyncio.sleep(args.hop_interval_ms / 1000)
    finally:
        await bus.stop()
        if backend != "memory":
            await cluster.delete_bus_data(
                {
                    "IOTMESH_BUS__BACKEND": backend,
                    "IOTMESH_BUS__NAMESPACE": settings.namespace,
                    "IOTMESH_CLUSTER__NAMESPACE": settings.namespace,
                }
            )
    q = statistics.quantiles(latencies, n=100)
    return {
        "backend": backend,
        "messages": len(latencies),
        "p50_ms": q[49] * 1e3,
        "p99_ms": q[98] * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="nats", choices=["nats", "redis"])
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--window", type=int, default=8, help="unacked messages per device")
    parser.add_argument("--cpu-work-us", type=float, default=1000.0)
    parser.add_argument("--backlog", type=int, default=150, help="(a): messages per device")
    parser.add_argument("--pipeline-batch", type=int, default=32)
    parser.add_argument("--warmup-s", type=float, default=4.0)
    parser.add_argument("--measure-s", type=float, default=10.0)
    parser.add_argument("--hop-messages", type=int, default=1000)
    parser.add_argument("--hop-interval-ms", type=float, default=2.0)
    parser.add_argument("--only", default="pipeline,transport,hop")
    args = parser.parse_args()
    only = set(args.only.split(","))
    console = Console()
    results: dict[str, Any] = {"machine": machine(), "args": vars(args)}

    if "pipeline" in only:
        runs = [throughput(args, n, 1, args.cpu_work_us, args.backlog) for n in (1, 2)]
        results["pipeline"] = runs
        for r in runs:
            console.print(
                f"pipeline workers {r['pipelines']}: {r['committed_per_s']:,.0f} committed/s,"
                f" worker CPU {r['worker_cpu_pct']} %, machine busy {r['machine_busy_pct']} %"
            )
    if "transport" in only:
        runs = [throughput(args, 2, n, 0.0, 0) for n in (1, 2)]
        results["transport"] = runs
        for r in runs:
            console.print(
                f"mqtt transports {r['transports']}: {r['acked_per_s']:,.0f} PUBACKs/s,"
                f" machine busy {r['machine_busy_pct']} %"
            )
    if "hop" in only:
        results["hop"] = [asyncio.run(hop_latency(b, args)) for b in ("memory", "nats", "redis")]

    table = Table(title=f"scale-out on one machine (bus {args.backend}, {args.devices} devices)")
    for column in ("case", "layout", "figure", "vs. 1"):
        table.add_column(column, justify="right")
    for key, what, field in (
        ("pipeline", "pipelines", "committed_per_s"),
        ("transport", "transports", "acked_per_s"),
    ):
        runs = results.get(key, [])
        for r in runs:
            base = runs[0][field] or 1.0
            unit = "committed/s" if key == "pipeline" else "PUBACKs/s"
            table.add_row(
                key, f"{r[what]} {what}", f"{r[field]:,.0f} {unit}", f"{r[field] / base:.2f}x"
            )
    for r in results.get("hop", []):
        table.add_row(
            "bus hop", r["backend"], f"p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms", ""
        )
    console.print(table)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
