"""Benchmark of hot state: latest values (memory vs Redis), connectivity's hot-path
call, the RPC-free parts of Redis hot state (connectivity push, rate-limit take).

Run: `.venv/bin/python bench/hot_state.py` (Redis on 127.0.0.1:6379, as scripts/test
starts it; `--help` for the knobs). Prints a table and writes bench/results/hot_state.json.

- latest update: `--batches` committed batches of `--batch` messages over `--devices`
  devices (3 keys each, all devices cached), as the pipeline calls it after each
  commit: time per batch and messages per second. Redis: one script call per batch.
- memory overhead per batch: `update([])` on the in-memory cache (what every committed
  batch pays for the cache on the default path); run it with PYTHONPATH pointing at
  another checkout to compare (a sync `update` there is timed as a plain call).
- connectivity `activity`: ns per call without a mirror (the MQTT hot path).
- connectivity push: one push of `--devices` changed devices to Redis.
- rate limit: `take` per second, local and Redis, `--concurrency` tasks.
Every loop is bounded by its count and `--max-seconds`.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from iotmesh.core.types import DeviceActivity, TelemetryMessage, TsPoint, TsRecord
from iotmesh.devicestate.connectivity import ConnectivityService
from iotmesh.pipeline.latest import LatestValues

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import write_host_results
from storage import python_loop_ns

RESULTS = Path(__file__).parent / "results" / "hot_state.json"
REDIS_URL = "redis://127.0.0.1:6379/15"


def _batches(args: argparse.Namespace) -> list[list[TelemetryMessage]]:
    out = []
    for b in range(args.batches):
        batch = []
        for i in range(args.batch):
            n = b * args.batch + i
            values = {"temperature": 20.5 + n % 10, "humidity": n % 100, "state": "ok"}
            batch.append(
                TelemetryMessage(f"m{n}", f"dev-{n % args.devices}", 0, [TsRecord(n, values)])
            )
        out.append(batch)
    return out


async def _update(latest: Any, batch: list[TelemetryMessage]) -> None:
    result = latest.update(batch)
    if inspect.isawaitable(result):
        await result


async def _fill(latest: Any, device_id: str) -> None:
    result = latest.fill(device_id, {"temperature": TsPoint(0, 0.0)})
    if inspect.isawaitable(result):
        await result


async def bench_latest(name: str, latest: Any, args: argparse.Namespace) -> dict[str, Any]:
    for d in range(args.devices):
        await _fill(latest, f"dev-{d}")
    batches = _batches(args)
    times: list[float] = []
    deadline = time.perf_counter() + args.max_seconds
    started = time.perf_counter()
    for batch in batches:
        t = time.perf_counter()
        await _update(latest, batch)
        times.append(time.perf_counter() - t)
        if t > deadline:
            break
    total = time.perf_counter() - started
    q = statistics.quantiles(times, n=100) if len(times) > 1 else times * 99
    return {
        "what": f"latest update ({name})",
        "ops": len(times) * args.batch,
        "per_s": len(times) * args.batch / total,
        "p50_us": q[49] * 1e6,
        "p99_us": q[98] * 1e6,
    }


async def bench_empty_update(args: argparse.Namespace) -> dict[str, Any]:
    latest = LatestValues()
    n = args.calls
    started = time.perf_counter()
    for _ in range(n):
        await _update(latest, [])
    total = time.perf_counter() - started
    return {
        "what": "memory update([]) per batch",
        "ops": n,
        "per_s": n / total,
        "ns_per_op": total / n * 1e9,
    }


def bench_activity(args: argparse.Namespace) -> dict[str, Any]:
    service = ConnectivityService()
    ids = [f"dev-{d}" for d in range(args.devices)]
    n = args.calls
    started = time.perf_counter()
    for i in range(n):
        service.activity(ids[i % len(ids)], "mqtt")
    total = time.perf_counter() - started
    return {
        "what": "connectivity.activity (no mirror)",
        "ops": n,
        "per_s": n / total,
        "ns_per_op": total / n * 1e9,
    }


async def bench_redis(args: argparse.Namespace) -> list[dict[str, Any]]:
    from iotmesh.core.settings import RedisSettings
    from iotmesh.storage.redis import (
        HotState,
        RedisConnectivityMirror,
        RedisLatestValues,
        RedisRateLimiter,
    )
    from iotmesh.transports.ratelimit import LocalRateLimiter

    hot = HotState(RedisSettings(url=REDIS_URL, namespace=f"bench{uuid.uuid4().hex[:8]}"))
    await hot.start()
    results = []
    try:
        results.append(await bench_latest("redis", RedisLatestValues(hot), args))
        mirror = RedisConnectivityMirror(hot)
        records = [
            (DeviceActivity(f"dev-{d}", "mqtt", 1000 + d, 1000, 0), 1) for d in range(args.devices)
        ]
        t = time.perf_counter()
        await mirror.push(records, full=True)
        push_s = time.perf_counter() - t
        results.append(
            {
                "what": f"connectivity push of {args.devices} devices (redis)",
                "ops": args.devices,
                "per_s": args.devices / push_s,
                "p50_us": push_s * 1e6,
            }
        )
        for name, limiter in (
            ("local", LocalRateLimiter(1e9, 10**9)),
            ("redis", RedisRateLimiter(hot, 1e9, 10**9, LocalRateLimiter(1e9, 10**9))),
        ):
            results.append(await bench_takes(name, limiter, args))
    finally:
        await hot.delete_everything()
        await hot.stop()
    return results


async def bench_takes(name: str, limiter: Any, args: argparse.Namespace) -> dict[str, Any]:
    per_task = args.calls // 100 // args.concurrency
    deadline = time.perf_counter() + args.max_seconds

    async def worker(w: int) -> int:
        done = 0
        for i in range(per_task):
            await limiter.take(f"dev-{(w * per_task + i) % args.devices}")
            done += 1
            if time.perf_counter() > deadline:
                break
        return done

    started = time.perf_counter()
    done = sum(await asyncio.gather(*(worker(w) for w in range(args.concurrency))))
    total = time.perf_counter() - started
    return {"what": f"rate limit take ({name})", "ops": done, "per_s": done / total}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--batches", type=int, default=400)
    parser.add_argument("--calls", type=int, default=1_000_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-seconds", type=float, default=60.0)
    parser.add_argument("--no-redis", action="store_true", help="only the in-memory parts")
    args = parser.parse_args()
    loop_ns_before = python_loop_ns()
    results = [
        await bench_empty_update(args),
        bench_activity(args),
        await bench_latest("memory", LatestValues(), args),
    ]
    if not args.no_redis:
        results += await bench_redis(args)
    loop_ns_after = python_loop_ns()

    table = Table(title="hot state")
    for column in ("what", "ops", "per s", "ns/op", "p50 µs/batch", "p99 µs/batch"):
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(
            r["what"],
            f"{r['ops']:,}",
            f"{r['per_s']:,.0f}",
            f"{r['ns_per_op']:.0f}" if "ns_per_op" in r else "-",
            f"{r['p50_us']:.0f}" if "p50_us" in r else "-",
            f"{r['p99_us']:.0f}" if "p99_us" in r else "-",
        )
    Console().print(table)
    write_host_results(RESULTS, args, (loop_ns_before, loop_ns_after), results)


if __name__ == "__main__":
    asyncio.run(main())
