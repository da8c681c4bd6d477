"""How long a query of recent points takes while small commits wait in batch rows.

Run: `.venv/bin/python bench/pending_reads.py` (~1 minute). For each count of pending
write transactions (`--pending`, default 32, 128, 256 and 512: from the old flush
threshold to the new cap, `writes._MAX_PENDING_BATCHES`), writes that many commits of
`--records` random devices out of `--devices` (3 keys each: the shape of MQTT
telemetry at a few thousand messages a second), runs no compaction, then times
`reads.query` of the newest 100 points of all 3 keys of `--queries` devices on a reader
connection. Prints a table and writes bench/results/pending_reads.json.

Why: a flush pass now waits for 8 chunks' worth of points (or the cap) instead of 32
transactions, so a query looks through more batch rows; this shows what that costs.
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from iotmesh.core.settings import SqliteSettings
from iotmesh.core.types import Order, TsRecord
from iotmesh.storage.sqlite import reads, schema
from iotmesh.storage.sqlite.writer_process import connect
from iotmesh.storage.sqlite.writes import SeriesWriter
from iotmesh.storage.timeseries import Query, SeriesWrite

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import machine
from storage import python_loop_ns

RESULTS = Path(__file__).parent / "results" / "pending_reads.json"
T0 = 1_700_000_000_000
KEYS = ["temperature", "humidity", "active"]


def measure(pending: int, args: argparse.Namespace) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="iotmesh-bench-") as tmp:
        path = Path(tmp) / "ts.db"
        conn = connect(path, "NORMAL")
        conn.execute("PRAGMA journal_mode = WAL")
        schema.migrate(conn)
        # Steps are queued but never run: every commit stays in batch rows.
        writer = SeriesWriter(conn, SqliteSettings(), lambda step: None, lambda: None)
        rnd = random.Random(pending)
        for i in range(pending):
            writer.write(
                [
                    SeriesWrite(
                        f"dev-{d}",
                        [
                            TsRecord(
                                T0 + i * 10, {"temperature": 21.5, "humidity": 40, "active": True}
                            )
                        ],
                    )
                    for d in rnd.sample(range(args.devices), args.records)
                ]
            )
        reader = sqlite3.connect(path, isolation_level=None)
        times = []
        for d in range(args.queries):
            q = Query(
                entity_id=f"dev-{d}", keys=KEYS, start_ts=T0, end_ts=T0 + 10**9, limit=100,
                order=Order.DESC,
            )  # fmt: skip
            started = time.perf_counter()
            reads.query(reader, q)
            times.append((time.perf_counter() - started) * 1000)
        reader.close()
        writer.close()
    times.sort()
    return {
        "pending": pending,
        "median_ms": statistics.median(times),
        "p99_ms": times[int(len(times) * 0.99)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pending", type=int, nargs="+", default=[32, 128, 256, 512])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--records", type=int, default=30, help="devices per commit")
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args()
    before = python_loop_ns()
    rows = [measure(n, args) for n in args.pending]
    after = python_loop_ns()
    RESULTS.parent.mkdir(exist_ok=True)
    document = {"machine": machine(), "args": vars(args), "loop_ns": [before, after]}
    RESULTS.write_text(json.dumps({**document, "results": rows}, indent=2) + "\n")
    table = Table(title=f"Query of 3 keys, newest 100 points, with small commits pending "
                  f"({args.records} of {args.devices:,} devices each)")  # fmt: skip
    for column in ("pending commits", "median", "p99"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(f"{r['pending']:,}", f"{r['median_ms']:.2f} ms", f"{r['p99_ms']:.2f} ms")
    Console().print(table)
    print(f"host: {before:.1f} / {after:.1f} ns per Python loop iteration")


if __name__ == "__main__":
    main()
