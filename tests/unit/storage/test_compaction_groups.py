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


def open_writer(path: Path) -> tuple[SeriesWriter, sqlite3.Connection, list[object]]:
    conn = connect(path, SqliteSettings().synchronous)
    conn.execute("PRAGMA journal_mode = WAL")
    schema.migrate(conn)
    steps: list[object] = []
    return SeriesWriter(conn, SqliteSettings(), steps.append, lambda: None), conn, steps


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
