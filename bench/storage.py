"""Benchmark of the time-series stores: ingest through the group-commit writer, then
aggregate queries, the same workload on each backend in one run.

Run: `.venv/bin/python bench/storage.py` (a few minutes; `--help` for the knobs).
Prints a table and writes bench/results/storage.json. `--backends sqlite,influxdb,postgres`
(default all three): SQLite in a temp dir; InfluxDB 1.x as a temporary `influxd` (the
Debian package, started like the tests start it: free port, data in a temp dir, WAL
fsynced on every write) unless `--influx-url` names a running one; PostgreSQL in a
database of its own, created on the server of `--postgres-url` (default: the local one,
user postgres) and dropped at the end.

1. Ingest: `--devices` devices send messages of 3 keys (temperature and humidity as
   doubles, count as a long). `--tasks` submitter tasks, like pipeline consumers, each
   own a share of the devices and submit batches of `--batch` messages (one
   `SeriesWrite` per message) to `BatchWriter`, waiting for each commit as a consumer
   waits before acking. The writer group-commits whatever is pending. Reported: points
   per second over the whole run (data generation included), commits, and the time the
   remaining compaction backlog took afterwards.
2. Query: AVG per minute over the whole range (every bucket: limit 100k), on 1M points
   of one series (1 Hz, ~11.6 days) and on 1000 series of 1000 points each (one query
   per series; total and median), after compaction (SQLite, PostgreSQL) has settled.
3. Rollups: one 1 Hz series over `--days` days (30: 2,592,000 points), AVG per minute
   and per hour over the whole range (43,200 and 720 buckets), on SQLite, PostgreSQL and
   InfluxDB with the default rollup levels (1 min, 1 h) and without rollups (InfluxDB then
   aggregates raw points itself). Also: how long the rollups took to build.

SQLite, PostgreSQL and InfluxDB stores get the default rollup levels (1 min, 1 h) unless
`--rollup-levels none`, so the ingest figure includes rollup upkeep (SQLite: background
steps of the writer process; PostgreSQL: in each compaction's transaction; InfluxDB: the
dirty markers each write sends first).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
from rich.console import Console
from rich.table import Table

from iotmesh.core.settings import (
    InfluxSettings,
    PostgresSettings,
    SqliteSettings,
    WriterSettings,
)
from iotmesh.core.types import Aggregation, Order, TsRecord
from iotmesh.storage.influx import InfluxClient, InfluxTimeSeriesStore
from iotmesh.storage.postgres import PostgresTimeSeriesStore
from iotmesh.storage.sqlite.tsdb import SqliteTimeSeriesStore
from iotmesh.storage.timeseries import Query, SeriesWrite, TimeSeriesStore
from iotmesh.storage.writer import BatchWriter

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))
from tests.influxd import InfluxServer
from tests.postgres import DEFAULT_URL as PG_DEFAULT_URL
from tests.postgres import with_database

from _measure import machine

RESULTS = Path(__file__).parent / "results" / "storage.json"
T0 = 1_700_000_000_000  # a fixed start, so runs are comparable
KEYS_PER_MESSAGE = 3


def value_pool(size: int = 4096) -> list[dict[str, Any]]:
    """Varied message bodies, reused round-robin: the store never mutates a record, and
    building fresh dicts would time the benchmark's generator instead of the store."""
    return [
        {"temperature": 20.0 + (i % 100) / 10, "humidity": 40.0 + (i % 37) / 3, "count": i}
        for i in range(size)
    ]


def python_loop_ns() -> float:
    """ns per iteration of a plain Python loop (best of 5): how fast the host is now.

    Shared VMs vary by 2x from hour to hour; this puts a run's figures in proportion.
    """
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        total = 0
        for i in range(200_000):
            total += i
        best = min(best, time.perf_counter() - started)
    return best / 200_000 * 1e9


class Backend:
    """Builds the stores of one backend: a fresh one (file, database) per name."""

    def __init__(self, name: str, data_dir: Path, args: argparse.Namespace) -> None:
        self.name = name
        self.data_dir = data_dir
        self.args = args
        self.influx_url: str = args.influx_url or ""
        self.postgres_url = ""

    def store(self, name: str, levels: list[int] | None = None) -> TimeSeriesStore:
        if self.name == "sqlite":
            settings = SqliteSettings(synchronous=self.args.sync)
            levels = self.args.levels if levels is None else levels
            return SqliteTimeSeriesStore(self.data_dir / f"{name}.db", settings, levels)
        if self.name == "postgres":
            schema = "bench_" + name.replace("-", "_")
            pg = PostgresSettings(url=self.postgres_url, schema_name=schema)
            return PostgresTimeSeriesStore(pg, self.args.levels if levels is None else levels)
        database = f"bench_{name}_{time.time_ns()}"
        settings = InfluxSettings(url=self.influx_url, database=database)
        levels = self.args.levels if levels is None else levels
        return InfluxTimeSeriesStore(settings, levels=levels)

    async def settle(self, store: TimeSeriesStore) -> float:
        """Wait for background work (SQLite and PostgreSQL compaction); return the
        seconds it took. PostgreSQL's leaves the block (hour) of each series' newest
        point as rows, as its background task does."""
        started = time.perf_counter()
        if isinstance(store, SqliteTimeSeriesStore | PostgresTimeSeriesStore):
            await store.compact()
        if isinstance(store, InfluxTimeSeriesStore):
            await store.roll_up()  # every marker, open buckets too
        return time.perf_counter() - started


async def submitter(
    writer: BatchWriter, devices: list[str], messages: int, batch: int, pool: list[dict[str, Any]]
) -> None:
    """One pipeline consumer: round-robin over its devices, one message per device-second."""
    sent = 0
    n_devices = len(devices)
    while sent < messages:
        out: list[SeriesWrite] = []
        for i in range(sent, min(sent + batch, messages)):
            ts = T0 + (i // n_devices) * 1000
            record = TsRecord(ts, pool[i % len(pool)])
            out.append(SeriesWrite(devices[i % n_devices], [record]))
        sent += len(out)
        await writer.write(out)


async def ingest(backend: Backend, args: argparse.Namespace) -> dict[str, Any]:
    store = backend.store("ingest")
    await store.open()
    try:
        writer = BatchWriter(store, WriterSettings())
        await writer.start()
        messages = args.points // KEYS_PER_MESSAGE
        devices = [f"device-{i:05d}" for i in range(args.devices)]
        pool = value_pool()
        started = time.perf_counter()
        async with asyncio.TaskGroup() as tg:
            for t in range(args.tasks):
                share = messages // args.tasks + (1 if t < messages % args.tasks else 0)
                tg.create_task(
                    submitter(writer, devices[t :: args.tasks], share, args.batch, pool),
                    name=f"submitter-{t}",
                )
        elapsed = time.perf_counter() - started
        await writer.stop()
        compact_s = await backend.settle(store)
        points = messages * KEYS_PER_MESSAGE
        return {
            "points": points,
            "seconds": elapsed,
            "points_per_s": points / elapsed,
            "commits": writer.counters.commits,
            "points_per_commit": points / max(writer.counters.commits, 1),
            "compaction_backlog_s": compact_s,
        }
    finally:
        await store.close()


def avg_per_minute(entity: str, start: int, end: int) -> Query:
    return Query(entity, ("v",), start, end, Aggregation.AVG, 60_000, 100_000, Order.ASC)


async def timed(store: TimeSeriesStore, q: Query) -> tuple[float, int]:
    started = time.perf_counter()
    result = await store.query(q)
    return time.perf_counter() - started, len(result.get("v", []))


async def queries(backend: Backend, args: argparse.Namespace) -> dict[str, Any]:
    store = backend.store("query")
    await store.open()
    try:
        # One series, 1 Hz, written 10k points per transaction.
        n = args.query_points
        for lo in range(0, n, 10_000):
            records = [
                TsRecord(T0 + i * 1000, {"v": float(i % 1000)})
                for i in range(lo, min(n, lo + 10_000))
            ]
            await store.write([SeriesWrite("single", records)])
        # 1000 series of n/1000 points each, every transaction touching all series.
        series = args.series
        per_series = n // series
        step = 100
        for lo in range(0, per_series, step):
            await store.write(
                [
                    SeriesWrite(
                        f"multi-{s:04d}",
                        [
                            TsRecord(T0 + i * 1000, {"v": float(i + s)})
                            for i in range(lo, min(per_series, lo + step))
                        ],
                    )
                    for s in range(series)
                ]
            )
        settle_s = await backend.settle(store)
        end = T0 + n * 1000
        single = [await timed(store, avg_per_minute("single", T0, end)) for _ in range(args.repeat)]
        buckets = single[0][1]
        multi: list[float] = []
        for s in range(series):
            seconds, _ = await timed(store, avg_per_minute(f"multi-{s:04d}", T0, end))
            multi.append(seconds)
        return {
            "compaction_backlog_s": settle_s,
            "single_series_points": n,
            "single_series_buckets": buckets,
            "single_series_ms_median": statistics.median(t for t, _ in single) * 1000,
            "single_series_ms_min": min(t for t, _ in single) * 1000,
            "multi_series": series,
            "multi_points_per_series": per_series,
            "multi_total_ms": sum(multi) * 1000,
            "multi_median_ms": statistics.median(multi) * 1000,
        }
    finally:
        await store.close()


def per(entity: str, start: int, end: int, interval: int) -> Query:
    return Query(entity, ("v",), start, end, Aggregation.AVG, interval, 100_000, Order.ASC)


async def rollup_queries(backend: Backend, args: argparse.Namespace) -> dict[str, Any]:
    """The 30-day series: AVG per minute / hour with rollups and without (SQLite,
    InfluxDB and PostgreSQL)."""
    variants = {"rollups": [60_000, 3_600_000], "raw": []}
    n = args.days * 86_400
    out: dict[str, Any] = {"points": n}
    for name, levels in variants.items():
        store = backend.store(f"days-{name}", levels)
        await store.open()
        try:
            started = time.perf_counter()
            for lo in range(0, n, 10_000):
                records = [
                    TsRecord(T0 + i * 1000, {"v": float(i % 1000)})
                    for i in range(lo, min(n, lo + 10_000))
                ]
                await store.write([SeriesWrite("month", records)])
            write_s = time.perf_counter() - started
            settle_s = await backend.settle(store)
            end = T0 + n * 1000 - 1
            row: dict[str, Any] = {"write_s": write_s, "settle_s": settle_s}
            for label, interval in (("minute", 60_000), ("hour", 3_600_000)):
                runs = [
                    await timed(store, per("month", T0, end, interval)) for _ in range(args.repeat)
                ]
                row[f"{label}_buckets"] = runs[0][1]
                row[f"{label}_ms_median"] = statistics.median(t for t, _ in runs) * 1000
                row[f"{label}_ms_min"] = min(t for t, _ in runs) * 1000
            out[name] = row
        finally:
            await store.close()
    return out


def report(results: dict[str, Any]) -> None:
    names = [n for n in ("sqlite", "influxdb", "postgres") if n in results["backends"]]
    runs = [results["backends"][n] for n in names]
    first = runs[0]
    ing, q = first["ingest"], first["query"]
    single = f"1 series x {q['single_series_points']:,} points"
    multi = f"{q['multi_series']:,} series x {q['multi_points_per_series']:,} points"
    table = Table(title="Time-series stores, same workload")
    table.add_column("measure")
    for name in names:
        table.add_column(name, justify="right")
    table.add_column("target (SQLite)", justify="right")

    def row(label: str, cell: Any, target: str = "") -> None:
        table.add_row(label, *(cell(r["ingest"], r["query"]) for r in runs), target)

    row(
        f"ingest via BatchWriter, {ing['points']:,} points",
        lambda i, _: f"{i['points_per_s']:,.0f} points/s",
        ">= 300,000",
    )
    row(
        "  commits (points per commit)",
        lambda i, _: f"{i['commits']:,} ({i['points_per_commit']:,.0f})",
    )
    row("  background work left after ingest", lambda i, _: f"{i['compaction_backlog_s']:.2f} s")
    row(
        "background work left after loading the query data",
        lambda _, r: f"{r['compaction_backlog_s']:.2f} s",
    )
    row(
        f"AVG/minute, {single} ({q['single_series_buckets']:,} buckets)",
        lambda _, r: f"{r['single_series_ms_median']:.1f} ms (min {r['single_series_ms_min']:.1f})",
        "<= 100 ms",
    )
    row(f"AVG/minute, {multi}: all queries", lambda _, r: f"{r['multi_total_ms']:.0f} ms")
    row("  one query, median", lambda _, r: f"{r['multi_median_ms']:.2f} ms")
    Console(width=160).print(table)
    days = Table(title="30 days of a 1 Hz series: AVG over the whole range")
    days.add_column("backend")
    for column in ("per minute", "per hour", "write", "settle (compaction, rollups)"):
        days.add_column(column, justify="right")
    for name in names:
        r = results["backends"][name].get("rollup_query")
        for variant in ("rollups", "raw"):
            if r is None or variant not in r:
                continue
            v = r[variant]
            days.add_row(
                f"{name}, {variant} ({r['points']:,} points)",
                f"{v['minute_ms_median']:.1f} ms ({v['minute_buckets']:,})",
                f"{v['hour_ms_median']:.1f} ms ({v['hour_buckets']:,})",
                f"{v['write_s']:.1f} s",
                f"{v['settle_s']:.1f} s",
            )
    Console(width=160).print(days)
    m = results["machine"]
    print(f"{m['cpu_model']}, {m['cpu_count']} CPUs, Python {m['python']}, {m['platform']}")
    if "influxdb_version" in results:
        print(f"InfluxDB {results['influxdb_version']}")
    if "postgres_version" in results:
        print(f"PostgreSQL {results['postgres_version']}")
    print(
        f"host speed: {m['python_loop_ns_before']:.1f} / {m['python_loop_ns_after']:.1f} ns per"
        " Python loop iteration (before / after; lower is faster)"
    )


async def _pg_admin(url: str, statement: str) -> str:
    """Run a statement on the server of `url`; return the server's version."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(statement)
        version: str = await conn.fetchval("SHOW server_version")
        return version
    finally:
        await conn.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=3_000_000, help="points to ingest")
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--tasks", type=int, default=8, help="concurrent submitters")
    parser.add_argument("--batch", type=int, default=500, help="messages per submitted batch")
    parser.add_argument("--query-points", type=int, default=1_000_000)
    parser.add_argument("--series", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=5, help="runs of the single-series query")
    parser.add_argument("--sync", choices=["FULL", "NORMAL"], default="FULL")
    parser.add_argument("--skip-ingest", action="store_true")
    parser.add_argument("--skip-query", action="store_true")
    parser.add_argument("--skip-rollup-query", action="store_true")
    parser.add_argument("--days", type=int, default=30, help="days of the 1 Hz rollup series")
    parser.add_argument(
        "--rollup-levels",
        default="60000,3600000",
        help="rollup levels (ms, comma-separated) of the SQLite, PostgreSQL and InfluxDB ingest and"
        " query stores;"
        " 'none' for none",
    )
    parser.add_argument(
        "--backends",
        default="sqlite,influxdb,postgres",
        help="comma-separated: sqlite, influxdb, postgres",
    )
    parser.add_argument(
        "--postgres-url",
        default=PG_DEFAULT_URL,
        help="a PostgreSQL server (its database is only used to create and drop the"
        " benchmark's own)",
    )
    parser.add_argument(
        "--influx-url", default=None, help="a running InfluxDB 1.x (default: start influxd)"
    )
    args = parser.parse_args()
    args.levels = (
        [] if args.rollup_levels == "none" else [int(x) for x in args.rollup_levels.split(",")]
    )
    names = [n.strip() for n in args.backends.split(",") if n.strip()]
    data_dir = Path(tempfile.mkdtemp(prefix="iotmesh-bench-"))
    influxd: InfluxServer | None = None
    pg_database: str | None = None
    try:
        results: dict[str, Any] = {"machine": machine(), "args": vars(args), "backends": {}}
        results["machine"]["python_loop_ns_before"] = python_loop_ns()
        for name in names:
            backend = Backend(name, data_dir, args)
            if name == "influxdb" and not backend.influx_url:
                influxd = InfluxServer.start(data_dir / "influxd")
                backend.influx_url = influxd.url
            if name == "influxdb":
                async with InfluxClient(InfluxSettings(url=backend.influx_url)) as client:
                    results["influxdb_version"] = (await client.ping()).version
            if name == "postgres":
                pg_database = f"iotmesh_bench_{uuid.uuid4().hex[:12]}"
                results["postgres_version"] = await _pg_admin(
                    args.postgres_url, f'CREATE DATABASE "{pg_database}"'
                )
                backend.postgres_url = with_database(args.postgres_url, pg_database)
            results["backends"][name] = {
                "ingest": None if args.skip_ingest else await ingest(backend, args),
                "query": None if args.skip_query else await queries(backend, args),
                "rollup_query": None
                if args.skip_rollup_query
                else await rollup_queries(backend, args),
            }
        results["machine"]["python_loop_ns_after"] = python_loop_ns()
    finally:
        if influxd is not None:
            influxd.stop()
        if pg_database is not None:
            await _pg_admin(args.postgres_url, f'DROP DATABASE "{pg_database}" WITH (FORCE)')
        shutil.rmtree(data_dir, ignore_errors=True)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    if not args.skip_ingest and not args.skip_query:
        report(results)
    else:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
