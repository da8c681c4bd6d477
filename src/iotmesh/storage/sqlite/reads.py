"""Queries, run on a reader thread with its own connection.

A query reads, per key, the chunks of the series that overlap the range (through the
covering index on `ts_chunk`) and its points in the batch rows not yet compacted (the
rows of its group whose series ids hold it, through the index on the series range of
`ts_batch`, read and sliced in one vectorised pass), and merges
them in write order: chunks by id, then batch rows by id (a batch row is always newer
than every chunk). Everything runs in one read transaction, so a concurrent commit or
compaction is either wholly seen or not at all.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

from iotmesh.core.types import Aggregation, Order, TsPoint
from iotmesh.storage import aggregate as agg
from iotmesh.storage.points import Points, merge
from iotmesh.storage.sqlite import batches, rollup_reads, schema
from iotmesh.storage.sqlite import chunks as chunking
from iotmesh.storage.timeseries import Query

# (id, min_ts, max_ts, n) of a chunk
Meta = tuple[int, int, int, int]


def query(db: sqlite3.Connection, q: Query, levels: Sequence[int] = ()) -> dict[str, list[TsPoint]]:
    """Answer a (validated) query; aggregations from rollups of `levels` where they can."""
    db.execute("BEGIN")  # one snapshot for every statement below
    try:
        out: dict[str, list[TsPoint]] = {}
        for key in dict.fromkeys(q.keys):
            row = db.execute(schema.SERIES_ID, (q.entity_id, key)).fetchone()
            if row is None:
                continue
            sid = int(row[0])
            recent = _recent(db, sid, q)
            points = None
            if q.agg is not Aggregation.NONE and levels:
                buckets = rollup_reads.answer(db, sid, q, recent, levels)
                if buckets is not None:
                    points = agg.to_ts_points(buckets, q.order, q.limit)
            if points is None:
                points = _series(db, sid, q, recent)
            if points:
                out[key] = points
        return out
    finally:
        if db.in_transaction:
            db.execute("COMMIT")


def _recent(db: sqlite3.Connection, sid: int, q: Query) -> list[Points]:
    """The series' points still in batch rows, as one part (or none), newest data last."""
    group_end = sid | ((1 << batches.GROUP_SHIFT) - 1)
    pattern = sid.to_bytes(8, "little", signed=True)
    rows = db.execute(
        schema.SERIES_BATCHES, (sid, q.start_ts, q.end_ts, group_end, pattern)
    ).fetchall()
    held = [rows[i] for i in batches.holding([row[0] for row in rows], sid)]
    return [batches.series_points(held, sid)] if held else []


def _series(db: sqlite3.Connection, sid: int, q: Query, recent: list[Points]) -> list[TsPoint]:
    """Read the chunks one key needs, from the `order` end on.

    All chunks at once when the answer may need them all; otherwise a growing number of
    chunks from the `order` end, until `aggregate.boundary` shows that no unread chunk
    can change the first `limit` answers (so "the newest 100 points" of a long series
    reads one or two chunks, not the whole series).
    """
    metas: list[Meta] = db.execute(schema.CHUNK_META, (sid, q.start_ts, q.end_ts)).fetchall()
    if not metas and not recent:
        return []
    if q.agg is Aggregation.NONE:
        read_all = sum(m[3] for m in metas) <= q.limit
    else:
        # The range the data covers within the query bounds the buckets (and so the
        # memory) of the answer; refuse before reading any blob if that is too many.
        first = max(q.start_ts, min([m[1] for m in metas] + [int(p.ts[0]) for p in recent]))
        last = min(q.end_ts, max([m[2] for m in metas] + [int(p.ts[-1]) for p in recent]))
        if first <= last:
            agg.check_buckets(first, last, q.interval_ms)
        read_all = last // q.interval_ms - first // q.interval_ms < q.limit
    if read_all or len(metas) <= 2:
        rows = schema.fetch_chunks(db, [m[0] for m in metas])
        return agg.to_ts_points(_compute(rows, recent, q), q.order, q.limit)
    desc = q.order is Order.DESC
    metas.sort(key=(lambda m: -m[2]) if desc else (lambda m: m[1]))
    step = _first_step(metas, q)
    rows = []
    done = 0
    while True:
        rows.extend(schema.fetch_chunks(db, [m[0] for m in metas[done : done + step]]))
        done = min(done + step, len(metas))
        rows.sort()
        result = _compute(rows, recent, q)
        if done == len(metas):
            break
        bound = agg.boundary(result, q.order, q.limit, q.interval_ms)
        if bound is not None and (metas[done][2] < bound if desc else metas[done][1] > bound):
            break
        step = done  # double what has been read
    return agg.to_ts_points(result, q.order, q.limit)


def _first_step(metas: list[Meta], q: Query) -> int:
    """How many chunks (from the order end) probably hold the first `limit` answers."""
    if q.agg is Aggregation.NONE:
        total = 0
        for i, meta in enumerate(metas):
            total += meta[3]
            if total >= q.limit:
                return i + 1
        return len(metas)
    span = q.limit * q.interval_ms
    if q.order is Order.DESC:
        floor = min(q.end_ts, metas[0][2]) - span
        return max(1, sum(1 for m in metas if m[2] >= floor))
    ceiling = max(q.start_ts, metas[0][1]) + span
    return max(1, sum(1 for m in metas if m[1] <= ceiling))


def _compute(
    rows: Sequence[tuple[int, int, bytes, bytes]], recent: list[Points], q: Query
) -> Points | agg.Buckets:
    parts = [chunking.decode(kind, ts, vals) for _, kind, ts, vals in rows]
    points = merge([*parts, *recent]).window(q.start_ts, q.end_ts)
    if q.agg is Aggregation.NONE:
        return points
    return agg.aggregate(points, q.agg, q.interval_ms)


def latest_rows(db: sqlite3.Connection, entity_id: str) -> list[tuple[str, int, int, Any]]:
    """(key, ts, kind, stored value) of each key of the entity that has data."""
    rows: list[tuple[str, int, int, Any]] = db.execute(schema.LATEST, (entity_id,)).fetchall()
    return rows
