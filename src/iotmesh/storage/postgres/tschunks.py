"""Chunks of the PostgreSQL time-series store: a series' older points as packed arrays.

A row of `ts_points` per point makes a query over 1M points read, and aggregate, 1M
heap tuples: ~0.5 s on the benchmark machine whatever the plan. So, like the SQLite
store, points are packed once they are unlikely to change: `ts_chunks` holds one row
per (series, block), a block being `CHUNK_SPAN_MS` of time aligned to the epoch (the
block of `ts` is `ts // span`, floored), with the block's points as columns in bytea:

    ts       int64 little-endian, ascending, each ts once
    kinds    uint8 (`points.Kind`); NULL when every point is a DOUBLE
    doubles  float64: DOUBLE values, LONG values as floats, 0.0 for other kinds
    longs    int64: LONG values, BOOL as 0/1; NULL when there is neither
    objects  a JSON array: STRING and JSON values at their positions, null elsewhere;
             NULL when there is neither

which is `points.Points`, so a read is `np.frombuffer` per column and the aggregation is
`storage/aggregate.py`'s, the SQLite store's. The bytea columns are stored EXTERNAL
(out of line, uncompressed): pglz would cost more to decompress than the bytes it saves.

Compaction (`compact_block`) moves the rows of one (series, block) into its chunk in
one transaction: `DELETE ... RETURNING` the rows (taking their row locks, in ts order),
merge them over the chunk's points (the rows are newer writes: they win), write the
chunk. A write of the same (series, ts) racing it waits for the delete's commit and then
inserts a fresh row, which overlays the chunk; nothing written is lost. Reads run in one
snapshot, so they see a block's points either as rows or in the chunk, never both or
neither.

Reads merge chunk points with the rows of the same range, rows last (newer), with
`points.merge`: a rewrite of a compacted ts, of any kind, is a row until the next
compaction folds it in. Deletes remove rows and cut the points out of the chunks they
touch (`delete_range`). Every chunk write and delete updates the block's rollups in
the same transaction (`tsrollups.py`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import asyncpg
import msgspec
import numpy as np
import numpy.typing as npt

from iotmesh.core.errors import StorageError
from iotmesh.storage.points import INT64_MAX, INT64_MIN, Kind, Points, classify, merge
from iotmesh.storage.postgres import tsrollups
from iotmesh.storage.postgres.connection import Conn

# One hour: a 1 Hz series packs 3,600 points (~57 KB) per chunk, a year is ~8,800 rows.
# Recorded in ts_meta when the chunks table is made; never changes for that schema.
CHUNK_SPAN_MS = 3_600_000

_json_enc = msgspec.json.Encoder()
_json_dec = msgspec.json.Decoder()
_objects_dec = msgspec.json.Decoder(list[Any])

MIGRATION = f"""
    CREATE TABLE ts_chunks (
        series_id  bigint NOT NULL,
        block      bigint NOT NULL,
        n          integer NOT NULL,
        ts         bytea NOT NULL,
        kinds      bytea,
        doubles    bytea NOT NULL,
        longs      bytea,
        objects    bytea,
        PRIMARY KEY (series_id, block)
    );
    ALTER TABLE ts_chunks ALTER COLUMN ts SET STORAGE EXTERNAL,
        ALTER COLUMN kinds SET STORAGE EXTERNAL, ALTER COLUMN doubles SET STORAGE EXTERNAL,
        ALTER COLUMN longs SET STORAGE EXTERNAL;
    INSERT INTO ts_meta VALUES ('chunk_span_ms', '{CHUNK_SPAN_MS}');
"""

CHUNK_COLUMNS = "ts, kinds, doubles, longs, objects"

_ROW_COLUMNS = "ts, kind, v_d, v_l, v_b, v_s, v_j"


def block_of(ts: int, span: int) -> int:
    """The block of `ts` (floor division, also for negative ts)."""
    return ts // span


def block_bounds(block: int, span: int) -> tuple[int, int]:
    """The first and last ts of `block`, clipped to int64."""
    lo = block * span
    return max(lo, INT64_MIN), min(lo + span - 1, INT64_MAX)


# -- encoding --------------------------------------------------------------------------


def encode(points: Points) -> tuple[bytes, bytes | None, bytes, bytes | None, bytes | None]:
    """The chunk columns of `points` (sorted, unique), in `CHUNK_COLUMNS` order."""
    all_double = len(points) == 0 or int(points.kinds.max()) == Kind.DOUBLE
    return (
        points.ts.astype("<i8", copy=False).tobytes(),
        None if all_double else points.kinds.astype(np.uint8, copy=False).tobytes(),
        points.doubles.astype("<f8", copy=False).tobytes(),
        None if points.longs is None else points.longs.astype("<i8", copy=False).tobytes(),
        None if points.objects is None else _json_enc.encode(points.objects),
    )


def decode(row: Sequence[Any] | asyncpg.Record, at: int = 0) -> Points:
    """The points of a chunk row whose `CHUNK_COLUMNS` start at column `at`."""
    ts_blob, kinds_blob, doubles_blob, longs_blob, objects_blob = row[at : at + 5]
    ts = np.frombuffer(ts_blob, "<i8").astype(np.int64, copy=False)
    if kinds_blob is None:
        kinds = np.zeros(len(ts), np.uint8)
    else:
        kinds = np.frombuffer(kinds_blob, np.uint8)
    doubles = np.frombuffer(doubles_blob, "<f8").astype(np.float64, copy=False)
    longs = None
    if longs_blob is not None:
        longs = np.frombuffer(longs_blob, "<i8").astype(np.int64, copy=False)
    objects = None if objects_blob is None else _objects_dec.decode(objects_blob)
    if not len(kinds) == len(doubles) == len(ts):
        raise StorageError("a PostgreSQL chunk's columns differ in length")
    return Points(ts, kinds, doubles, longs, objects)


def row_value(kind: int, v_d: Any, v_l: Any, v_b: Any, v_s: Any, v_j: Any) -> Any:
    """The value of a `ts_points` row, in its stored type."""
    if kind == Kind.DOUBLE:
        return float(v_d)
    if kind == Kind.LONG:
        return int(v_l)
    if kind == Kind.BOOL:
        return bool(v_b)
    if kind == Kind.STRING:
        return _json_dec.decode(v_j) if v_s is None else v_s
    if kind == Kind.JSON:
        return _json_dec.decode(v_j)
    raise StorageError(f"a PostgreSQL point has an unknown kind {kind!r}")


def rows_to_points(rows: Sequence[asyncpg.Record]) -> Points:
    """`Points` of `ts_points` rows (`_ROW_COLUMNS`), of one series, in any order.

    Numeric rows (the usual case, and the bulk of a block not compacted yet) become
    columns without a Python value per point.
    """
    n = len(rows)
    if n == 0:
        return Points.empty()
    kinds = np.fromiter((r[1] for r in rows), np.uint8, n)
    if int(kinds.max()) <= Kind.LONG:
        ts = np.fromiter((r[0] for r in rows), np.int64, n)
        longs = None
        if int(kinds.max()) == Kind.LONG:
            longs = np.fromiter((r[3] or 0 for r in rows), np.int64, n)
            doubles = np.fromiter(
                (float(r[3]) if r[2] is None else r[2] for r in rows), np.float64, n
            )
        else:
            doubles = np.fromiter((r[2] for r in rows), np.float64, n)
        order = np.argsort(ts, kind="stable")  # rows are unique by ts (the primary key)
        points = Points(ts, kinds, doubles, longs, None)
        return points if bool(np.all(order[1:] > order[:-1])) else points.take(order)
    return Points.from_values(
        [r[0] for r in rows], [row_value(r[1], r[2], r[3], r[4], r[5], r[6]) for r in rows]
    )


def value_columns(value: Any) -> tuple[int, Any, Any, Any, Any, Any]:
    """(kind, v_d, v_l, v_b, v_s, v_j) of a value, as the store writes a row."""
    kind, v = classify(value)
    if kind is Kind.STRING and "\x00" not in v:
        return kind, None, None, None, v, None
    return (
        kind,
        v if kind is Kind.DOUBLE else None,
        v if kind is Kind.LONG else None,
        v if kind is Kind.BOOL else None,
        None,
        _json_enc.encode(v).decode() if kind >= Kind.STRING else None,
    )


# -- reads -----------------------------------------------------------------------------


async def read(
    conn: Conn,
    sid: int,
    start: int,
    end: int,
    span: int,
    chunk_limit: int | None = None,
    *,
    desc: bool = False,
) -> list[Points]:
    """The chunks of `sid` whose block overlaps [start, end], ascending.

    `chunk_limit`: at most that many, from the `desc` end.
    """
    sql = (
        f"SELECT {CHUNK_COLUMNS} FROM ts_chunks WHERE series_id = $1 AND block >= $2"
        f" AND block <= $3 ORDER BY block {'DESC' if desc else 'ASC'}"
    )
    args: list[Any] = [sid, block_of(start, span), block_of(end, span)]
    if chunk_limit is not None:
        sql += " LIMIT $4"
        args.append(chunk_limit)
    parts = [decode(r) for r in await conn.fetch(sql, *args)]
    if desc:
        parts.reverse()
    return parts


async def rows(
    conn: Conn, sid: int, start: int, end: int, limit: int | None = None, *, desc: bool = False
) -> Points:
    """The `ts_points` rows of `sid` in [start, end] (the first `limit` from the `desc`
    end when given) as Points."""
    sql = f"SELECT {_ROW_COLUMNS} FROM ts_points WHERE series_id = $1 AND ts >= $2 AND ts <= $3"
    args: list[Any] = [sid, start, end]
    if limit is not None:
        sql += f" ORDER BY ts {'DESC' if desc else 'ASC'} LIMIT $4"
        args.append(limit)
    return rows_to_points(await conn.fetch(sql, *args))


# The series of keys of an entity, and whether each has chunks in a block range ($3..$4):
# one round trip for what decides how each key is read.
SERIES_WITH_CHUNKS = """
    SELECT s.key, s.id, EXISTS (
        SELECT 1 FROM ts_chunks c WHERE c.series_id = s.id AND c.block >= $3 AND c.block <= $4
    ) FROM ts_series s WHERE s.entity_id = $1 AND s.key = ANY($2::text[])
"""


async def series_with_chunks(
    conn: Conn, entity_id: str, keys: list[str], start: int, end: int, span: int
) -> dict[str, tuple[int, bool]]:
    """Per key of `entity_id` that has a series: (series id, has chunks in [start, end])."""
    rows = await conn.fetch(
        SERIES_WITH_CHUNKS, entity_id, keys, block_of(start, span), block_of(end, span)
    )
    return {r[0]: (r[1], r[2]) for r in rows}


async def series_points(conn: Conn, sid: int, start: int, end: int, span: int) -> Points:
    """Every point of `sid` in [start, end]: chunks, overlaid by the rows."""
    parts = await read(conn, sid, start, end, span)
    parts.append(await rows(conn, sid, start, end))
    return merge(parts).window(start, end)


# -- compaction ------------------------------------------------------------------------

# Per series: the block of its oldest row, where that is older than the block of its
# newest point (or any block, with $1 true). An index probe per series.
_CANDIDATES = """
    SELECT l.series_id, o.ts FROM ts_latest l CROSS JOIN LATERAL (
        SELECT ts FROM ts_points WHERE series_id = l.series_id ORDER BY ts LIMIT 1
    ) o
    WHERE $1 OR (CASE WHEN o.ts >= 0 THEN o.ts / $2 ELSE (o.ts + 1) / $2 - 1 END)
              < (CASE WHEN l.ts >= 0 THEN l.ts / $2 ELSE (l.ts + 1) / $2 - 1 END)
    LIMIT $3
"""


async def candidates(
    conn: Conn, span: int, everything: bool, limit: int = 1000
) -> list[tuple[int, int]]:
    """(series id, block) pairs to compact: the oldest block of rows of each series
    that has rows in a block older than that of its newest point (every series with
    rows, when `everything`)."""
    found = await conn.fetch(_CANDIDATES, everything, span, limit)
    return [(r[0], block_of(r[1], span)) for r in found]


def series_lock(sid: int) -> tuple[str, int]:
    """The transaction-level advisory lock taken on a series' chunks (compaction,
    deletes), so that two of them never rewrite one chunk from the same old version."""
    return "SELECT pg_advisory_xact_lock(hashtext('iotmesh:chunks'), $1::int)", sid % 2**31


async def compact_block(
    conn: Conn, sid: int, block: int, span: int, *, levels: Sequence[int]
) -> int:
    """Move the rows of (sid, block) into its chunk (and its rollups of `levels`);
    return how many moved.

    Run inside a transaction.
    """
    await conn.execute(*series_lock(sid))
    lo, hi = block_bounds(block, span)
    # Lock the rows in ts order first, as writers do (they sort), so that the two do not
    # deadlock; then the DELETE's own RETURNING is what moves, rows that arrived in
    # between included. (One DELETE ... WHERE ts IN (SELECT ... FOR UPDATE) was planned
    # as a nested loop, quadratic, on partitions without statistics yet.)
    span_rows = "FROM ts_points WHERE series_id = $1 AND ts >= $2 AND ts <= $3"
    await conn.execute(f"SELECT 1 {span_rows} ORDER BY ts FOR UPDATE", sid, lo, hi)
    moved = await conn.fetch(f"DELETE {span_rows} RETURNING {_ROW_COLUMNS}", sid, lo, hi)
    if not moved:
        return 0
    old = await conn.fetchrow(
        f"SELECT {CHUNK_COLUMNS} FROM ts_chunks WHERE series_id = $1 AND block = $2",
        sid,
        block,
    )
    parts = [] if old is None else [decode(old)]
    parts.append(rows_to_points(moved))
    await write_chunk(conn, sid, block, merge(parts), span, levels)
    return len(moved)


async def write_chunk(
    conn: Conn, sid: int, block: int, points: Points, span: int, levels: Sequence[int]
) -> None:
    """Store `points` as the chunk of (sid, block), and their rollups of `levels` (see
    `tsrollups.py`); an empty one deletes the chunk."""
    await tsrollups.refresh(conn, sid, [(block, points)], span, levels)
    if len(points) == 0:
        await conn.execute("DELETE FROM ts_chunks WHERE series_id = $1 AND block = $2", sid, block)
        return
    await conn.execute(
        f"INSERT INTO ts_chunks (series_id, block, n, {CHUNK_COLUMNS})"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
        " ON CONFLICT (series_id, block) DO UPDATE SET n = excluded.n, ts = excluded.ts,"
        " kinds = excluded.kinds, doubles = excluded.doubles, longs = excluded.longs,"
        " objects = excluded.objects",
        sid,
        block,
        len(points),
        *encode(points),
    )


# -- deletes ---------------------------------------------------------------------------


async def delete_range(
    conn: Conn,
    sids: Sequence[int],
    start: int,
    end: int,
    span: int,
    deleted_rows: Mapping[int, npt.NDArray[np.int64]],
    *,
    levels: Sequence[int],
) -> int:
    """Delete the chunk points of `sids` in [start, end]; return how many points that
    removed besides `deleted_rows` (per series, the ts of the rows just deleted: a row
    rewriting a chunk's point is one point, not two).

    Run inside a transaction. Blocks wholly inside the range go as rows; the (at most
    two) blocks at its edges are rewritten without the deleted points. Their rollups
    follow (`tsrollups.py`).
    """
    first, last = block_of(start, span), block_of(end, span)
    count = 0
    for sid in sorted(set(sids)):
        await conn.execute(*series_lock(sid))  # held already by a store's delete: no-op
        # Whole blocks: the ones strictly inside, and an edge block the range covers.
        whole_lo = first if block_bounds(first, span)[0] >= start else first + 1
        whole_hi = last if block_bounds(last, span)[1] <= end else last - 1
        rows_ts = deleted_rows.get(sid, np.empty(0, np.int64))
        gone: list[npt.NDArray[np.int64]] = []
        if whole_lo <= whole_hi:
            for (blob,) in await conn.fetch(
                "DELETE FROM ts_chunks WHERE series_id = $1 AND block >= $2"
                " AND block <= $3 RETURNING ts",
                sid,
                whole_lo,
                whole_hi,
            ):
                gone.append(np.frombuffer(blob, "<i8").astype(np.int64, copy=False))
            await tsrollups.forget_blocks(conn, sid, whole_lo, whole_hi, span, levels)
        for block in sorted({first, last} - set(range(whole_lo, whole_hi + 1))):
            row = await conn.fetchrow(
                f"SELECT {CHUNK_COLUMNS} FROM ts_chunks WHERE series_id = $1 AND block = $2"
                " FOR UPDATE",
                sid,
                block,
            )
            if row is None:
                continue
            points = decode(row)
            inside = (points.ts >= start) & (points.ts <= end)
            if not inside.any():
                continue
            gone.append(points.ts[inside])
            await write_chunk(conn, sid, block, points.take(np.flatnonzero(~inside)), span, levels)
        await tsrollups.drop_expired(conn, sid, start, end, span, levels)
        for stamps in gone:
            count += int(np.count_nonzero(~np.isin(stamps, rows_ts)))
    return count


async def lock_series(conn: Conn, sids: Sequence[int]) -> None:
    """Take `series_lock` of every series of `sids`, in ascending order, in one
    statement (before any of their rows is locked, as compaction takes them)."""
    await conn.execute(
        "SELECT pg_advisory_xact_lock(hashtext('iotmesh:chunks'), (s % 2147483648)::int)"
        " FROM (SELECT DISTINCT s FROM unnest($1::bigint[]) AS u (s) ORDER BY s) o",
        list(sids),
    )


async def expire(
    conn: Conn, sids: Sequence[int], cutoff: int, span: int, *, levels: Sequence[int]
) -> None:
    """Delete the chunk points of `sids` older than `cutoff` (retention).

    Run inside a transaction, after `lock_series` and `tsrollups.record_expiry` (the
    rollups keep the expired points' aggregates). The blocks wholly before the cutoff
    go in one statement; the one the cutoff cuts is rewritten, per series that has it.
    """
    cut = block_of(cutoff, span)
    await conn.execute(
        "DELETE FROM ts_chunks WHERE series_id = ANY($1::bigint[]) AND block < $2",
        list(sids),
        cut,
    )
    if block_bounds(cut, span)[0] == cutoff:
        return
    for row in await conn.fetch(
        f"SELECT series_id, {CHUNK_COLUMNS} FROM ts_chunks"
        " WHERE series_id = ANY($1::bigint[]) AND block = $2 FOR UPDATE",
        list(sids),
        cut,
    ):
        points = decode(row, 1)
        keep = points.ts >= cutoff
        if not keep.all():
            await write_chunk(conn, row[0], cut, points.take(np.flatnonzero(keep)), span, levels)


async def build_rollups(conn: Conn, sid: int, span: int, levels: Sequence[int]) -> None:
    """Compute the rollups of `levels` of every chunk of `sid` (levels added to a store
    with chunks). Run inside a transaction."""
    await conn.execute(*series_lock(sid))
    blocks = [
        r[0] for r in await conn.fetch("SELECT block FROM ts_chunks WHERE series_id = $1", sid)
    ]
    for at in range(0, len(blocks), 64):  # bounded memory: 64 chunks at a time
        rows = await conn.fetch(
            f"SELECT block, {CHUNK_COLUMNS} FROM ts_chunks"
            " WHERE series_id = $1 AND block = ANY($2::bigint[])",
            sid,
            blocks[at : at + 64],
        )
        await tsrollups.refresh(conn, sid, [(r[0], decode(r, 1)) for r in rows], span, levels)


async def newest(conn: Conn, sid: int) -> tuple[int, Any] | None:
    """The newest point of `sid` (ts, value), rows and chunks together; None if none."""
    row = await conn.fetchrow(
        f"SELECT {_ROW_COLUMNS} FROM ts_points WHERE series_id = $1 ORDER BY ts DESC LIMIT 1",
        sid,
    )
    chunk = await conn.fetchrow(
        f"SELECT {CHUNK_COLUMNS} FROM ts_chunks WHERE series_id = $1 ORDER BY block DESC LIMIT 1",
        sid,
    )
    best: tuple[int, Any] | None = None
    if chunk is not None:
        points = decode(chunk)
        best = int(points.ts[-1]), points.values(len(points) - 1)[0]
    if row is not None and (best is None or row[0] >= best[0]):
        best = row[0], row_value(row[1], row[2], row[3], row[4], row[5], row[6])
    return best


__all__ = [
    "CHUNK_SPAN_MS",
    "MIGRATION",
    "block_of",
    "build_rollups",
    "candidates",
    "compact_block",
    "decode",
    "delete_range",
    "encode",
    "expire",
    "lock_series",
    "newest",
    "read",
    "rows",
    "series_lock",
    "series_points",
    "series_with_chunks",
    "value_columns",
    "write_chunk",
]
