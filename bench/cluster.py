"""Cluster timings: leader takeover after `kill -9`, failure detection, call overhead.

Run: `.venv/bin/python bench/cluster.py` (Redis on 127.0.0.1:6379 and NATS with
JetStream on 127.0.0.1:4222, as scripts/test starts them; `--help` for the knobs).
Prints a table and writes bench/results/cluster.json.

For each backend, `--trials` times:
- takeover: two candidate processes (tests/integration/cluster_candidate.py) for one
  lease of `--lease` seconds; the leader is killed with SIGKILL; measured from the kill
  to the other reporting leadership. Bound: lease + lease / 3 (+ one request).
- detection: one registered process (tests/integration/cluster_http_instance.py)
  beating every `--heartbeat` seconds, watched by a Discovery client; killed with
  SIGKILL at a random phase of its heartbeat; measured from the kill to phi reaching
  the threshold (so up to one interval less than from the last heartbeat). Bound: see
  docs/architecture.md (interval + acceptable pause + z(threshold) * std + 2 * poll).
- call: `Discovery.call` with a no-op function over 3 registered instances, per
  policy, in process (the overhead of picking, breakers and bookkeeping).
Each trial uses a fresh namespace, deleted afterwards; every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from iotmesh.cluster import Discovery, Instance, make_backend
from iotmesh.cluster.phi import z_of
from iotmesh.core.settings import BusSettings, ClusterSettings, Settings

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import machine

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results" / "cluster.json"


def settings_for(backend: str, args: argparse.Namespace) -> Settings:
    return Settings(
        cluster=ClusterSettings(
            backend=backend,  # type: ignore[arg-type]
            namespace=f"bench{uuid.uuid4().hex[:8]}",
            heartbeat_interval_s=args.heartbeat,
            ttl_s=max(30.0, args.heartbeat * 10),
            lease_s=args.lease,
        ),
        bus=BusSettings(redis_url="redis://127.0.0.1:6379/15"),
    )


async def spawn(module: str, *argv: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        module,
        *argv,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}"},
        stdout=asyncio.subprocess.PIPE,
    )


async def line(proc: asyncio.subprocess.Process, prefix: str, within: float) -> str:
    assert proc.stdout is not None
    async with asyncio.timeout(within):
        while True:
            text = (await proc.stdout.readline()).decode()
            if not text:
                raise RuntimeError(f"child exited before printing {prefix!r}")
            if text.startswith(prefix):
                return text.strip()


async def cleanup(settings: Settings, procs: list[asyncio.subprocess.Process]) -> None:
    for p in procs:
        if p.returncode is None:
            p.kill()
        await p.wait()
    backend = make_backend(settings)
    await backend.start()
    await backend.delete_everything()
    await backend.stop()


async def takeover(backend: str, args: argparse.Namespace) -> float:
    settings = settings_for(backend, args)
    procs: list[asyncio.subprocess.Process] = []
    try:
        for owner in ("one", "two"):
            procs.append(
                await spawn(
                    "tests.integration.cluster_candidate",
                    settings.model_dump_json(),
                    "bench",
                    owner,
                )
            )
        waits = [asyncio.create_task(line(p, "leader", 60)) for p in procs]
        done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        first = waits.index(done.pop())
        os.kill(procs[first].pid, signal.SIGKILL)
        killed = time.perf_counter()
        await waits[1 - first]
        return time.perf_counter() - killed
    finally:
        await cleanup(settings, procs)


async def detection(backend: str, args: argparse.Namespace) -> tuple[float, float]:
    settings = settings_for(backend, args)
    procs: list[asyncio.subprocess.Process] = []
    cluster = make_backend(settings)
    await cluster.start()
    try:
        procs.append(
            await spawn(
                "tests.integration.cluster_http_instance",
                settings.model_dump_json(),
                "echo",
                "victim",
            )
        )
        await line(procs[0], "ready", 60)
        discovery = Discovery(cluster, "echo", settings.cluster)
        async with discovery:
            # Let the detector learn the rhythm, then kill at a random point of a beat.
            await asyncio.sleep(args.heartbeat * (20 + random.random()))
            os.kill(procs[0].pid, signal.SIGKILL)
            killed = time.perf_counter()
            async with asyncio.timeout(120):
                while any(v.alive for v in discovery.members()):  # noqa: ASYNC110
                    await asyncio.sleep(0.005)
            took = time.perf_counter() - killed
            mean, std = discovery._members["echo.victim"].detector.stats()
            c = settings.cluster
            bound = mean + c.acceptable_pause_s + z_of(c.phi_threshold) * std
            bound += 2 * discovery.poll_s
            return took, bound
    finally:
        await cluster.stop()
        await cleanup(settings, procs)


async def call_overhead(args: argparse.Namespace) -> dict[str, float]:
    settings = settings_for("redis", args)
    cluster = make_backend(settings)
    await cluster.start()
    results = {}
    try:
        for i in range(3):
            await cluster.put(Instance(service="svc", instance_id=f"i{i}", seq=1))

        async def noop(instance: Instance) -> None:
            return None

        for policy in ("round_robin", "least_outstanding", "consistent_hash"):
            discovery = Discovery(cluster, "svc", settings.cluster, policy=policy)
            async with discovery:
                n = args.calls
                started = time.perf_counter()
                for k in range(n):
                    await discovery.call(noop, key=f"device-{k % 1000}")
                results[policy] = (time.perf_counter() - started) / n * 1e6
    finally:
        await cluster.delete_everything()
        await cluster.stop()
    return results


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="redis,nats")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--lease", type=float, default=3.0)
    parser.add_argument("--heartbeat", type=float, default=1.0)
    parser.add_argument("--calls", type=int, default=20_000)
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    for backend in args.backends.split(","):
        takes = [await takeover(backend, args) for _ in range(args.trials)]
        detects = [await detection(backend, args) for _ in range(args.trials)]
        rows.append(
            {
                "backend": backend,
                "takeover_s": takes,
                "takeover_bound_s": args.lease + args.lease / 3,
                "detection_s": [d for d, _ in detects],
                "detection_bound_s": [b for _, b in detects],
            }
        )
    overhead = await call_overhead(args)

    table = Table(title=f"cluster: lease {args.lease} s, heartbeat {args.heartbeat} s")
    for column in (
        "backend",
        "takeover s (median, max)",
        "bound",
        "detect s (median, max)",
        "bound",
    ):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(
            r["backend"],
            f"{statistics.median(r['takeover_s']):.2f}, {max(r['takeover_s']):.2f}",
            f"{r['takeover_bound_s']:.2f}",
            f"{statistics.median(r['detection_s']):.2f}, {max(r['detection_s']):.2f}",
            f"{max(r['detection_bound_s']):.2f}",
        )
    Console().print(table)
    for policy, us in overhead.items():
        print(f"Discovery.call overhead, {policy}: {us:.1f} µs per call")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {"machine": machine(), "args": vars(args), "results": rows, "call_us": overhead},
            indent=2,
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
