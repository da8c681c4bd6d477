"""The SQL the PostgreSQL time-series store reads with, and how rows become values.

A key with chunks in the range (`tschunks.py`) is read into `Points` and answered by
`storage/aggregate.py` (`chunked`), or, for an aggregation a rollup level answers, from
rollups, raw edges and pending buckets (`rolled_up`, planned by
`storage/rollup_plan.py`); a key whose points in the range are all rows is answered by
the SQL below.

Aggregation of rows runs in PostgreSQL, per key, with the contract's rules (see
`storage/timeseries.py`; the SQLite store computes the same with numpy in
`storage/aggregate.py`):

- buckets are `[k * interval, (k + 1) * interval)`: the bucket of `ts` is
  `ts - ts % interval`, less one interval when `ts % interval` is negative (`%` truncates
  towards zero, the bucket must floor), and carries its start as ts;
- GROUP BY makes no empty buckets; the numeric aggregations read `kind <= 1` (DOUBLE and
  LONG) only, so a bucket of strings, bools and JSON has no row;
- a bucket whose points are all longs answers a long: SUM from `sum(v_l)`, which
  PostgreSQL computes as numeric, so it is exact even past int64, AVG from that exact
  sum divided here, MIN/MAX from `min(v_l)`/`max(v_l)`; any double makes the answer a
  double, computed on `num` (the longs as float8, as numpy does);
- NaN: PostgreSQL orders NaN above every number, numpy's minimum/maximum propagate it;
  MIN and MAX of a bucket holding a NaN answer NaN, as the SQLite store does.

Before aggregating, a probe finds where the key's data lies in the range (`min(ts)`,
`max(ts)`, index-only), to refuse too many buckets (`aggregate.check_buckets`, counted
as the SQLite store counts them) and narrow the scan.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import asyncpg
import msgspec

from iotmesh.core.errors import StorageError
from iotmesh.core.types import Aggregation, Order, TsPoint
from iotmesh.storage import aggregate, rollup, rollup_plan
from iotmesh.storage.points import Kind, merge
from iotmesh.storage.postgres import tschunks, tsrollups
from iotmesh.storage.postgres.connection import Conn
from iotmesh.storage.timeseries import Query

_json = msgspec.json.Decoder()

VALUE_COLUMNS = "kind, v_d, v_l, v_b, v_s, v_j"

_RANGE = "series_id = $1 AND ts >= $2 AND ts <= $3"

RAW = {
    order: f"SELECT ts, {VALUE_COLUMNS} FROM ts_points WHERE {_RANGE}"
    f" ORDER BY ts {order.value} LIMIT $4"
    for order in Order
}

PROBE = f"SELECT min(ts), max(ts) FROM ts_points WHERE {_RANGE}"

_BUCKET = "ts - ts % $4::bigint - CASE WHEN ts % $4::bigint < 0 THEN $4::bigint ELSE 0 END"
_NUM = "CASE WHEN kind = 1 THEN v_l::float8 ELSE v_d END"

COUNT = {
    order: f"SELECT {_BUCKET} AS b, count(*) FROM ts_points WHERE {_RANGE}"
    f" GROUP BY b ORDER BY b {order.value} LIMIT $5"
    for order in Order
}

# Columns: bucket, count, all longs, sum of longs (numeric), sum, min and max of the
# longs, of all (as float8), and whether a NaN is among them.
NUMERIC = {
    order: "SELECT b, count(*), bool_and(kind = 1), sum(v_l), sum(num), min(v_l), max(v_l),"
    " min(num), max(num), bool_or(num = 'NaN')"
    f" FROM (SELECT {_BUCKET} AS b, kind, v_l, {_NUM} AS num FROM ts_points"
    f" WHERE {_RANGE} AND kind <= 1) p"
    f" GROUP BY b ORDER BY b {order.value} LIMIT $5"
    for order in Order
}


def value(row: Sequence[Any] | asyncpg.Record, at: int = 1) -> Any:
    """The value of a row whose `VALUE_COLUMNS` start at column `at`, in its stored type."""
    kind = row[at]
    if kind == Kind.DOUBLE:
        return float(row[at + 1])
    if kind == Kind.LONG:
        return int(row[at + 2])
    if kind == Kind.BOOL:
        return bool(row[at + 3])
    if kind == Kind.STRING:
        text = row[at + 4]
        return _json.decode(row[at + 5]) if text is None else text
    if kind == Kind.JSON:
        return _json.decode(row[at + 5])
    raise StorageError(f"a PostgreSQL point has an unknown kind {kind!r}")


async def raw(
    conn: Conn, sid: int, start: int, end: int, order: Order, limit: int
) -> list[TsPoint]:
    rows = await conn.fetch(RAW[order], sid, start, end, limit)
    return [TsPoint(r[0], value(r)) for r in rows]


async def aggregated(
    conn: Conn,
    sid: int,
    start: int,
    end: int,
    agg: Aggregation,
    interval_ms: int,
    order: Order,
    limit: int,
) -> list[TsPoint]:
    """The buckets of one key (see the module docstring)."""
    first, last = await conn.fetchrow(PROBE, sid, start, end) or (None, None)
    if first is None or last is None:
        return []
    aggregate.check_buckets(first, last, interval_ms)
    if agg is Aggregation.COUNT:
        rows = await conn.fetch(COUNT[order], sid, first, last, interval_ms, limit)
        return [TsPoint(r[0], int(r[1])) for r in rows]
    rows = await conn.fetch(NUMERIC[order], sid, first, last, interval_ms, limit)
    return [TsPoint(r[0], _bucket_value(agg, r)) for r in rows]


async def chunked(
    conn: Conn,
    sid: int,
    start: int,
    end: int,
    agg: Aggregation,
    interval_ms: int,
    order: Order,
    limit: int,
    span: int,
) -> list[TsPoint]:
    """The answer of one key with points in chunks: read into `Points`, answered by
    `storage/aggregate.py` (see `tschunks.py`).

    A raw query reads the first `limit` rows and `limit + 2` chunks from the `order`
    end: a chunk overlapping the range holds at least one point of it, but the two at
    its edges, so those are enough; a row rewriting a chunk's point replaces it.
    """
    if agg is Aggregation.NONE:
        desc = order is Order.DESC
        parts = await tschunks.read(conn, sid, start, end, span, limit + 2, desc=desc)
        parts.append(await tschunks.rows(conn, sid, start, end, limit, desc=desc))
        points = merge(parts).window(start, end)
        return aggregate.to_ts_points(points, order, limit)
    points = await tschunks.series_points(conn, sid, start, end, span)
    if len(points):  # counted over points of every kind, as the SQL path's probe does
        aggregate.check_buckets(int(points.ts[0]), int(points.ts[-1]), interval_ms)
    buckets = aggregate.aggregate(points, agg, interval_ms)
    return aggregate.to_ts_points(buckets, order, limit)


# The chunks of series $1 in the block ranges [$2[i], $3[i]] (disjoint), ascending.
_CHUNKS_IN_RANGES = f"""
    SELECT {tschunks.CHUNK_COLUMNS} FROM unnest($2::bigint[], $3::bigint[]) AS r (lo, hi)
    JOIN ts_chunks c ON c.series_id = $1 AND c.block >= r.lo AND c.block <= r.hi
    ORDER BY c.block
"""


async def rolled_up(
    conn: Conn, sid: int, q: Query, plan: rollup_plan.Plan, span: int
) -> list[TsPoint]:
    """The buckets of one key from rollups (`tsrollups.py`) where `plan` says, from raw
    points elsewhere: the range's edges, and the level buckets holding a row (a point
    not packed into its chunk yet, so not in the rollups)."""
    size, r0, r1 = plan.size, plan.r0, plan.r1
    recent = await tschunks.rows(conn, sid, q.start_ts, q.end_ts)
    pending = plan.pending([recent.ts])
    blobs = await conn.fetch(
        tsrollups.BLOCKS, sid, size, tschunks.block_of(r0, span), tschunks.block_of(r1 - 1, span)
    )
    stored = rollup.concat_sorted([b for (b,) in blobs])  # blocks in order: sorted
    ranges: list[list[int]] = []  # [first, last] blocks of the raw spans, coalesced
    for a, b in sorted(plan.raw_spans(q, pending)):
        lo, hi = tschunks.block_of(a, span), tschunks.block_of(b, span)
        if ranges and lo <= ranges[-1][1] + 1:
            ranges[-1][1] = max(ranges[-1][1], hi)
        else:
            ranges.append([lo, hi])
    rows = await conn.fetch(_CHUNKS_IN_RANGES, sid, [r[0] for r in ranges], [r[1] for r in ranges])
    points = merge([*(tschunks.decode(r) for r in rows), recent]).window(q.start_ts, q.end_ts)
    buckets = rollup_plan.answer(q, plan, stored, points, pending)
    return aggregate.to_ts_points(buckets, q.order, q.limit)


def _bucket_value(agg: Aggregation, row: asyncpg.Record) -> Any:
    _, n, all_long, long_sum, total, long_min, long_max, low, high, has_nan = row
    if agg is Aggregation.AVG:
        return int(long_sum) / n if all_long else total / n
    if agg is Aggregation.SUM:
        return int(long_sum) if all_long else float(total)
    if agg is Aggregation.MIN:
        return int(long_min) if all_long else math.nan if has_nan else float(low)
    return int(long_max) if all_long else math.nan if has_nan else float(high)


__all__ = [
    "PROBE",
    "RAW",
    "VALUE_COLUMNS",
    "aggregated",
    "chunked",
    "raw",
    "rolled_up",
    "value",
]
