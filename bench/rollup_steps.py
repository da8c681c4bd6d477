"""How long the SQLite writer's background rollup steps take: a write waits at most one.

Run: `.venv/bin/python bench/rollup_steps.py` (~1 minute). Writes `--devices` devices x
3 keys at 1 point per device-second for `--seconds` seconds through the writer (no
rollups yet: they are left due), compacting as the writer does (each compaction step
timed), then runs every due rollup step, as the
writer process runs them between writes (`roll_next(force=False)`, one transaction
each), and reports their durations. Each commits with `synchronous = FULL` here, an
fsync each; the writer's own steps commit with NORMAL (`SeriesWriter._step`), so these
figures are an upper bound. A write that arrives while a
step runs waits for that one step, like for a compaction step (budget 4 ms).
Prints a table and writes bench/results/rollup_steps.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

from rich.console import Console
from rich.table import Table

from iotmesh.core.settings import SqliteSettings
from iotmesh.core.types import TsRecord
from iotmesh.storage.sqlite import schema, writes
from iotmesh.storage.sqlite.writer_process import connect
from iotmesh.storage.sqlite.writes import SeriesWriter
from iotmesh.storage.timeseries import SeriesWrite

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import machine

RESULTS = Path(__file__).parent / "results" / "rollup_steps.json"
T0 = 1_700_000_000_000


def flush(writer: SeriesWriter, times: list[float]) -> None:
    """Compaction as the writer's steps do it (a group of series, or merges of up to 16
    series, per transaction), each step timed; rollup steps are left for later."""
    writer._start_pass()
    while writer._pass:
        started = time.perf_counter()
        writer._transaction(writer._flush_groups)
        times.append((time.perf_counter() - started) * 1000)
    while writer._to_merge:
        started = time.perf_counter()
        writer._merge_some()
        times.append((time.perf_counter() - started) * 1000)


def summary(times: list[float]) -> dict[str, float]:
    times = sorted(times)
    return {
        "steps": len(times),
        "median_ms": statistics.median(times),
        "p99_ms": times[int(len(times) * 0.99)],
        "max_ms": times[-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--seconds", type=int, default=1200, help="device time written")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="iotmesh-bench-") as tmp:
        conn = connect(Path(tmp) / "ts.db", "FULL")
        conn.execute("PRAGMA journal_mode = WAL")
        schema.migrate(conn)
        compaction: list[float] = []
        writer = SeriesWriter(
            conn, SqliteSettings(), lambda step: None, lambda: None, [60_000, 3_600_000]
        )
        for sec in range(args.seconds):
            writer.write(
                [
                    SeriesWrite(
                        f"d{i}", [TsRecord(T0 + sec * 1000, {"a": 1.0, "b": 2.0, "c": sec})]
                    )
                    for i in range(args.devices)
                ]
            )
            if sec % 32 == 31:
                flush(writer, compaction)
        flush(writer, compaction)
        # The writer's own step, minus the scheduling (private members: a bench only).
        rollups = writer._rollups
        times = []
        while rollups.due:
            started = time.perf_counter()
            deadline = started + writes._STEP_BUDGET_S
            writer._transaction(partial(rollups.roll_next, force=False, deadline=deadline))
            times.append((time.perf_counter() - started) * 1000)
        conn.close()
    result = {
        "machine": machine(),
        "args": vars(args),
        "rollup": summary(times),
        "compaction": summary(compaction),
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    title = f"Writer steps, {args.devices * 3:,} series x {args.seconds:,} s at 1 Hz"
    table = Table(title=title)
    for column in ("step", "steps", "median", "p99", "max"):
        table.add_column(column, justify="right")
    for name in ("rollup", "compaction"):
        r = result[name]
        table.add_row(
            name,
            f"{r['steps']:,}",
            f"{r['median_ms']:.2f} ms",
            f"{r['p99_ms']:.2f} ms",
            f"{r['max_ms']:.2f} ms",
        )
    Console().print(table)


if __name__ == "__main__":
    main()
