"""Aggregate queries answered from rollups where they answer exactly, raw points elsewhere.

The plan is `storage/rollup_plan.py`'s, shared with the PostgreSQL store; this module
reads what it needs from SQLite. A level's usable range for a series is
[expired_before, lo): not before the level's TTL horizon (older buckets were deleted,
raw points may not have been), and before its watermark `lo` (see `rollups.py`).
Pending buckets are those holding a point still in a batch row.

All of it reads inside the query's one read transaction: rollups, watermark and chunks
are of one commit.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from iotmesh.storage import aggregate as agg
from iotmesh.storage import rollup, rollup_plan
from iotmesh.storage.points import Points, merge
from iotmesh.storage.sqlite import chunks as chunking
from iotmesh.storage.sqlite import schema
from iotmesh.storage.timeseries import Query

_B = schema.ROLLUP_BLOCK


def answer(
    db: sqlite3.Connection, sid: int, q: Query, recent: list[Points], levels: Sequence[int]
) -> agg.Buckets | None:
    """The buckets of one key from rollups and raw points; None: no level helps."""

    def usable(size: int) -> tuple[int, int] | None:
        row = db.execute(schema.ROLLUP_RANGE, (sid, size)).fetchone()
        return None if row is None else (int(row[0]), int(row[1]))

    plan = rollup_plan.choose(levels, q, usable)
    if plan is None:
        return None
    size, r0, r1 = plan.size, plan.r0, plan.r1
    pending = plan.pending([p.ts for p in recent])
    blobs = db.execute(schema.ROLLUP_BLOCKS, (sid, size, r0 // size // _B, (r1 - 1) // size // _B))
    stored = rollup.concat_sorted([blob for (blob,) in blobs])  # blocks in order: sorted
    spans = plan.raw_spans(q, pending)
    ids = sorted({cid for a, b in spans for cid, *_ in db.execute(schema.CHUNK_META, (sid, a, b))})
    parts = [chunking.decode(kind, ts, vals) for _, kind, ts, vals in schema.fetch_chunks(db, ids)]
    points = merge([*parts, *recent]).window(q.start_ts, q.end_ts)
    return rollup_plan.answer(q, plan, stored, points, pending)
