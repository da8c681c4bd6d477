"""Batch rows are cut at series-group boundaries, so compaction moves a few groups at a
time; rows from before that rule (spanning groups) are moved all at once on open."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from iotmesh.core.settings import SqliteSettings
from iotmesh.core.types import TsRecord
from iotmesh.storage.sqlite import batches, schema, writes
from iotmesh.storage.sqlite.batches import GROUP_SHIFT
from iotmesh.storage.sqlite.writer_process import connect
from iotmesh.storage.sqlite.writes import SeriesWriter
from iotmesh.storage.timeseries import SeriesWrite

T0 = 1_700_000_000_000


def open_writer(
    path: Path, settings: SqliteSettings | None = None
) -> tuple[SeriesWriter, sqlite3.Connection, list[object]]:
    settings = settings or SqliteSettings()
    conn = connect(path, settings.synchronous)
    conn.execute("PRAGMA journal_mode = WAL")
    schema.migrate(conn)
    steps: list[object] = []
    return SeriesWriter(conn, settings, steps.append, lambda: None), conn, steps


def many_devices(n: int, ts: int) -> list[SeriesWrite]:
    return [SeriesWrite(f"dev-{i}", [TsRecord(ts, {"a": 1.0, "b": 2})]) for i in range(n)]


def row_spans(conn: sqlite3.Connection) -> list[tuple[int, int]]:
    return conn.execute("SELECT min_sid, max_sid FROM ts_batch ORDER BY id").fetchall()


def test_no_batch_row_spans_two_series_groups(tmp_path: Path) -> None:
    writer, conn, _ = open_writer(tmp_path / "ts.db")
    writer.write(many_devices(700, T0))  # 1400 series: 6 groups
    spans = row_spans(conn)
    assert all(lo >> GROUP_SHIFT == hi >> GROUP_SHIFT for lo, hi in spans)
    assert len({lo >> GROUP_SHIFT for lo, _ in spans}) == 6
    writer.close()


def test_rows_spanning_groups_are_compacted_when_the_store_opens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(batches, "GROUP_SHIFT", 30)  # the old rule: cut by size only
    writer, conn, _ = open_writer(tmp_path / "ts.db")
    writer.write(many_devices(700, T0))
    assert any(lo >> GROUP_SHIFT != hi >> GROUP_SHIFT for lo, hi in row_spans(conn))
    points = conn.execute("SELECT sum(n) FROM ts_batch").fetchone()[0]
    writer.close()
    monkeypatch.undo()

    writer, conn, _ = open_writer(tmp_path / "ts.db")
    assert row_spans(conn) == []
    assert conn.execute("SELECT sum(n) FROM ts_chunk").fetchone()[0] == points
    writer.close()


def test_a_flush_pass_moves_a_few_groups_per_step(tmp_path: Path) -> None:
    writer, conn, steps = open_writer(tmp_path / "ts.db")
    for i in range(40):  # past the flush threshold (4 x compact_min_chunks writes)
        writer.write(many_devices(700, T0 + i))
    groups_left = []
    while steps:
        steps.pop(0)()  # type: ignore[operator]
        groups_left.append(len({lo >> GROUP_SHIFT for lo, _ in row_spans(conn)}))
    per_step = writes._GROUPS_PER_STEP
    assert groups_left[: 6 // per_step] == list(range(6 - per_step, -1, -per_step))
    assert conn.execute("SELECT sum(n) FROM ts_chunk").fetchone()[0] == 40 * 1400
    writer.close()


def test_small_writes_wait_for_points_enough_before_a_flush_pass(tmp_path: Path) -> None:
    """32 commits of a few points each would make chunks of one point: a pass waits for
    8 chunks' worth of points, or for the cap on pending writes."""
    writer, conn, steps = open_writer(tmp_path / "ts.db")
    for i in range(writes._MAX_PENDING_BATCHES - 1):
        writer.write(many_devices(10, T0 + i))  # 20 points a commit
    assert steps == []  # nothing to flush yet: 10,220 points, short of 8 x 4096
    writer.write(many_devices(10, T0 + 10_000))
    assert len(steps) == 1
    while steps:
        steps.pop(0)()  # type: ignore[operator]
    assert row_spans(conn) == []
    assert conn.execute("SELECT max(n) FROM ts_chunk").fetchone()[0] == writes._MAX_PENDING_BATCHES
    writer.close()


def test_pending_points_are_counted_again_when_the_store_opens(tmp_path: Path) -> None:
    writer, _, steps = open_writer(tmp_path / "ts.db")
    for i in range(20):
        writer.write(many_devices(700, T0 + i))  # 1400 points a commit: 28,000
    writer.close()
    writer, _, steps = open_writer(tmp_path / "ts.db")
    assert steps == []
    for i in range(12):  # 32 commits and 44,800 points: due
        writer.write(many_devices(700, T0 + 100 + i))
    assert len(steps) == 1
    writer.close()


def test_a_step_commits_without_fsync_and_puts_full_back(tmp_path: Path) -> None:
    """Compaction transactions skip their own fsync (the next write's FULL commit
    syncs them); writes keep the configured `synchronous`."""
    writer, conn, steps = open_writer(tmp_path / "ts.db")
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    seen: list[int] = []
    flush = writer._flush_groups

    def spy() -> None:
        seen.append(conn.execute("PRAGMA synchronous").fetchone()[0])
        flush()

    writer._flush_groups = spy  # type: ignore[method-assign]
    for i in range(40):
        writer.write(many_devices(700, T0 + i))
    while steps:
        steps.pop(0)()  # type: ignore[operator]
    assert seen
    assert set(seen) == {1}  # NORMAL inside the steps
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2
    writer.close()


def test_a_waiting_request_ends_a_step_at_its_next_transaction(tmp_path: Path) -> None:
    small = SqliteSettings(chunk_max_points=16, compact_min_chunks=2)  # flush every 8 writes
    writer, _, steps = open_writer(tmp_path / "ts.db", small)
    for i in range(8):  # a flush pass: one chunk per series
        writer.write(many_devices(700, T0 + i))
    while steps:
        steps.pop(0)()  # type: ignore[operator]
    writer.interrupted = lambda: True  # from now on a request always waits
    for i in range(8, 16):  # a second pass: two chunks per series, every series due
        writer.write(many_devices(700, T0 + i))
    for _ in range(20):  # (a step that stops early queues the next: run a few)
        steps.pop(0)()  # type: ignore[operator]
    assert not writer._pass  # the second pass ran, one group per step...
    assert len(writer._to_merge) == 1400  # ...but no merge: each time a request waited
    writer.interrupted = lambda: False
    writer.write(many_devices(1, T0 + 100))
    while steps:
        steps.pop(0)()  # type: ignore[operator]
    assert writer._to_merge == {}
    writer.close()
