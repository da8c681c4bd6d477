"""Aggregate queries answered from rollups where they answer exactly, raw points elsewhere.

Planning one key (`answer`): the coarsest level whose width divides `interval_ms` (so
each query bucket is whole level buckets; both are aligned to the epoch) and that has
rolled-up buckets inside the range. Level buckets are used where they lie wholly
inside [start_ts, end_ts], before the level's watermark `lo` (see `rollups.py`) and
not before the level's TTL horizon (older buckets were deleted, raw points may not
have been), except those holding a point still in a batch row. Everything else, the range's edges
that cut a level bucket, the buckets not rolled up yet, is computed from raw points
into partial buckets of the same width, so the two kinds simply add up
(`storage/rollup.py` combines them and applies the aggregation rules).

All of it reads inside the query's one read transaction: rollups, watermark and chunks
are of one commit.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

import numpy as np

from iotmesh.storage import aggregate as agg
from iotmesh.storage import rollup
from iotmesh.storage.points import I64Array, Points, merge
from iotmesh.storage.sqlite import chunks as chunking
from iotmesh.storage.sqlite import schema
from iotmesh.storage.timeseries import Query

_B = schema.ROLLUP_BLOCK


def answer(
    db: sqlite3.Connection, sid: int, q: Query, recent: list[Points], levels: Sequence[int]
) -> agg.Buckets | None:
    """The buckets of one key from rollups and raw points; None: no level helps."""
    for size in rollup.level_for(levels, q.interval_ms):
        row = db.execute(schema.ROLLUP_RANGE, (sid, size)).fetchone()
        if row is None:
            continue
        expired_before, lo = int(row[0]), int(row[1])
        r0 = max(rollup.ceil(q.start_ts, size), expired_before)
        r1 = min(rollup.floor(q.end_ts + 1, size), lo)
        if r1 - r0 >= 2 * size:  # worth it: at least two whole buckets
            return _answer(db, sid, q, recent, size, r0, r1)
    return None


def _answer(
    db: sqlite3.Connection,
    sid: int,
    q: Query,
    recent: list[Points],
    size: int,
    r0: int,
    r1: int,
) -> agg.Buckets:
    # Level buckets holding a point not yet in chunks are computed from raw points.
    inside = [p.ts[(p.ts >= r0) & (p.ts < r1)] for p in recent]
    pending: I64Array = np.unique(np.concatenate([*inside, np.empty(0, np.int64)]) // size * size)
    blobs = db.execute(schema.ROLLUP_BLOCKS, (sid, size, r0 // size // _B, (r1 - 1) // size // _B))
    used = rollup.concat_sorted([blob for (blob,) in blobs])  # blocks in order: sorted
    lo, hi = np.searchsorted(used["ts"], [r0, r1])
    used = used[lo:hi]  # a view
    if len(pending):
        used = used[~np.isin(used["ts"], pending)]
    raw = _raw_partials(db, sid, q, recent, size, r0, r1, pending)
    if len(pending):
        parts = rollup.concat_sorted([used, raw])
    else:  # raw partials lie before r0 or from r1 on: already in order, one copy
        cut = int(np.searchsorted(raw["ts"], r0))
        parts = np.concatenate([raw[:cut], used, raw[cut:]])
    if len(parts):
        agg.check_buckets(int(parts["ts"][0]), int(parts["ts"][-1]), q.interval_ms)
    return rollup.answer(rollup.combine(parts, q.interval_ms), q.agg)


def _raw_partials(
    db: sqlite3.Connection,
    sid: int,
    q: Query,
    recent: list[Points],
    size: int,
    r0: int,
    r1: int,
    pending: I64Array,
) -> rollup.RollupArray:
    """Level-width partial buckets of the raw points the rollups do not cover."""
    spans = [(q.start_ts, r0 - 1), (r1, q.end_ts)]
    spans += [(int(b), int(b) + size - 1) for b in pending.tolist()]
    spans = [(a, b) for a, b in spans if a <= b]
    ids = sorted({cid for a, b in spans for cid, *_ in db.execute(schema.CHUNK_META, (sid, a, b))})
    parts = [chunking.decode(kind, ts, vals) for _, kind, ts, vals in schema.fetch_chunks(db, ids)]
    points = merge([*parts, *recent]).window(q.start_ts, q.end_ts)
    if not len(points):
        return rollup.empty()
    ts = points.ts
    covered = (ts >= r0) & (ts < r1)
    if len(pending):
        covered &= ~np.isin(ts - ts % size, pending)
    if covered.any():
        points = points.take(np.flatnonzero(~covered))
    return rollup.compute(points, size)
