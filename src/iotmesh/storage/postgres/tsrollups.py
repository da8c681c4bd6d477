"""Rollups of the PostgreSQL time-series store: kept equal to the chunks, in their commits.

    ts_rollups        (series_id, level, block, buckets)   `rollup.ROLLUP` records of the
                      PRIMARY KEY (series_id, level, block) chunk (series_id, block), at
                                                           the level's width
    ts_rollup_levels  (level, built_through, expired_before)
                      built_through: NULL once every chunk has the level's rollups; else
                      the series (by id) done so far (a level added to existing data);
                      expired_before: the level's buckets before it were deleted (TTL)
    ts_expired        (series_id, before)                  raw points before `before`
                                                           were expired by retention

One row per (series, level, chunk block): the buckets of the block's points at the
level's width. Every change of a chunk (`tschunks.write_chunk`: compaction, the edges
of a delete, the block a retention cutoff cuts) calls `refresh` in the same
transaction, and whole blocks deleted call `forget_blocks`, so the rollups of a block
are always those of its chunk: a reader needs no watermark, only the rows of
`ts_points` (not packed yet: recent blocks, late points, rewrites) make buckets
*pending*, computed from raw points at read time (`storage/rollup_plan.py`).

A level need not divide the chunk span: a level bucket that a block edge cuts (a
level wider than the span, or one like 7 minutes in hourly blocks) has a partial
record in each block it touches, with the bucket's start as ts. Partials add up exactly
(`rollup.combine`), so the reader sums them like any other parts.

Retention: before raw points expire, the rows among them are packed (so they reach the
rollups), then `record_expiry` notes the cutoff per series, aligned down to the coarsest
level (`RetentionPolicy.raw_cutoff`), so no level bucket is half expired. From then on
`refresh` keeps the buckets before it as they are (the rollups outlive the raw points)
and leaves a point older than it out (a late point, which the next pass deletes),
and a delete of an expired range deletes the buckets it covers whole (`drop_expired`),
as the SQLite store does. A level's TTL deletes its rows a block at a time, aligned to
both the level and the span (`apply_level_ttls`); readers use the level only from
`expired_before` on.

A level configured on a store that has chunks already is built by `build_step`s (the
background compaction task runs them; `compact` runs them to the end); readers use it
once `built_through` is NULL. A level no longer configured is dropped at open. Every
instance sharing a schema must be configured with the same levels.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence

import numpy as np

from iotmesh.storage import rollup
from iotmesh.storage.points import INT64_MAX, Points
from iotmesh.storage.postgres.connection import Conn
from iotmesh.storage.rollup import RetentionPolicy

MIGRATION = """
    CREATE TABLE ts_rollups (
        series_id  bigint NOT NULL,
        level      bigint NOT NULL,
        block      bigint NOT NULL,
        buckets    bytea NOT NULL,
        PRIMARY KEY (series_id, level, block)
    );
    ALTER TABLE ts_rollups ALTER COLUMN buckets SET STORAGE EXTERNAL;
    CREATE TABLE ts_rollup_levels (
        level           bigint PRIMARY KEY,
        built_through   bigint,
        expired_before  bigint NOT NULL DEFAULT -9223372036854775808
    );
    CREATE TABLE ts_expired (
        series_id  bigint PRIMARY KEY,
        before     bigint NOT NULL
    );
"""

# Beyond every bucket start: the end of a level's usable range.
_NO_END = 2**63

BLOCKS = """
    SELECT buckets FROM ts_rollups
    WHERE series_id = $1 AND level = $2 AND block >= $3 AND block <= $4 ORDER BY block
"""
_UPSERT = """
    INSERT INTO ts_rollups (series_id, level, block, buckets)
    SELECT $1, * FROM unnest($2::bigint[], $3::bigint[], $4::bytea[])
    ON CONFLICT (series_id, level, block) DO UPDATE SET buckets = excluded.buckets
"""
_DELETE = """
    DELETE FROM ts_rollups WHERE series_id = $1
    AND (level, block) IN (SELECT * FROM unnest($2::bigint[], $3::bigint[]))
"""


# -- levels ----------------------------------------------------------------------------


async def sync_levels(conn: Conn, levels: Sequence[int]) -> bool:
    """Drop the levels no longer configured, add the new ones; return whether any
    level still has to be built from existing chunks. Run inside a transaction."""
    known = {r[0] for r in await conn.fetch("SELECT level FROM ts_rollup_levels")}
    if gone := sorted(known - set(levels)):
        await conn.execute("DELETE FROM ts_rollups WHERE level = ANY($1::bigint[])", gone)
        await conn.execute("DELETE FROM ts_rollup_levels WHERE level = ANY($1::bigint[])", gone)
    if new := sorted(set(levels) - known):
        # On a store without chunks a new level is complete at once.
        chunks = await conn.fetchval("SELECT EXISTS (SELECT 1 FROM ts_chunks)")
        await conn.execute(
            "INSERT INTO ts_rollup_levels (level, built_through)"
            " SELECT unnest($1::bigint[]), $2::bigint ON CONFLICT DO NOTHING",
            new,
            0 if chunks else None,
        )
    return bool(
        await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM ts_rollup_levels WHERE built_through IS NOT NULL)"
        )
    )


async def usable(conn: Conn) -> dict[int, tuple[int, int]]:
    """Per complete level, the range of buckets a reader may use: [expired_before, end)."""
    rows = await conn.fetch(
        "SELECT level, expired_before FROM ts_rollup_levels WHERE built_through IS NULL"
    )
    return {int(r[0]): (int(r[1]), _NO_END) for r in rows}


async def building(conn: Conn) -> tuple[list[int], int] | None:
    """The levels still being built and the series id to go on after; None: none."""
    rows = await conn.fetch(
        "SELECT level, built_through FROM ts_rollup_levels WHERE built_through IS NOT NULL"
    )
    if not rows:
        return None
    return sorted(int(r[0]) for r in rows), min(int(r[1]) for r in rows)


async def built(conn: Conn, levels: Sequence[int], through: int | None) -> None:
    """Record that `levels` are built for series up to `through` (None: all)."""
    await conn.execute(
        "UPDATE ts_rollup_levels SET built_through ="
        " CASE WHEN $2::bigint IS NULL THEN NULL ELSE greatest(built_through, $2) END"
        " WHERE level = ANY($1::bigint[]) AND built_through IS NOT NULL",
        list(levels),
        through,
    )


# -- upkeep, with the chunks -----------------------------------------------------------


async def expired_before(conn: Conn, sid: int) -> int | None:
    """The raw expiry of a series (points before it were deleted); None: none yet."""
    before: int | None = await conn.fetchval(
        "SELECT before FROM ts_expired WHERE series_id = $1", sid
    )
    return before


async def refresh(
    conn: Conn, sid: int, blocks: Sequence[tuple[int, Points]], span: int, levels: Sequence[int]
) -> None:
    """Make the rollups of each (block, points) of `sid` those of the points (the block's
    chunk as just written; empty: deleted), for every level of `levels`.

    Buckets before the series' raw expiry keep what they hold: their raw points are gone.
    Run inside a transaction holding the series' chunk lock.
    """
    if not levels or not blocks:
        return
    before = await expired_before(conn, sid)
    old: dict[tuple[int, int], rollup.RollupArray] = {}
    if before is not None and min(b for b, _ in blocks) * span < before:
        rows = await conn.fetch(
            "SELECT level, block, buckets FROM ts_rollups"
            " WHERE series_id = $1 AND block = ANY($2::bigint[])",
            sid,
            [b for b, _ in blocks],
        )
        for level, block, data in rows:
            parts = np.frombuffer(data, rollup.ROLLUP)
            old[level, block] = parts[parts["ts"] < before]
    changes: list[tuple[int, int, rollup.RollupArray]] = []
    for block, points in blocks:
        if before is not None:
            points = points.window(before, INT64_MAX)
        for size in levels:
            new = rollup.compute(points, size)
            kept = old.get((size, block))
            if kept is not None and len(kept):
                new = rollup.concat_sorted([kept, new])
            changes.append((size, block, new))
    await _store(conn, sid, changes)


async def _store(conn: Conn, sid: int, changes: list[tuple[int, int, rollup.RollupArray]]) -> None:
    """Write (level, block, buckets) rows of `sid`; no buckets: delete the row."""
    kept = [(s, b, parts.tobytes()) for s, b, parts in changes if len(parts)]
    gone = [(s, b) for s, b, parts in changes if not len(parts)]
    if kept:
        await conn.execute(_UPSERT, sid, *(list(column) for column in zip(*kept, strict=True)))
    if gone:
        await conn.execute(_DELETE, sid, [s for s, _ in gone], [b for _, b in gone])


async def forget_blocks(
    conn: Conn, sid: int, first: int, last: int, span: int, levels: Sequence[int]
) -> None:
    """The chunks of blocks [first, last] of `sid` were deleted whole: so go their
    rollups, but for the buckets before the raw expiry (see `refresh`)."""
    if not levels:
        return
    before = await expired_before(conn, sid)
    free = first if before is None else max(first, -(-before // span))  # starts >= before
    if free <= last:
        await conn.execute(
            "DELETE FROM ts_rollups WHERE series_id = $1 AND block >= $2 AND block <= $3",
            sid,
            free,
            last,
        )
    if before is not None and first <= before // span <= last and before % span:
        await refresh(conn, sid, [(before // span, Points.empty())], span, levels)


async def drop_expired(
    conn: Conn, sid: int, start: int, end: int, span: int, levels: Sequence[int]
) -> None:
    """Points of `sid` in [start, end] were deleted: where that range had expired
    already, delete the buckets it covers whole (those it cuts keep their aggregates:
    there is nothing left to recompute them from)."""
    if not levels:
        return
    before = await expired_before(conn, sid)
    if before is None or start >= before:
        return
    last = min(end, before - 1)
    rows = await conn.fetch(
        "SELECT level, block, buckets FROM ts_rollups"
        " WHERE series_id = $1 AND block >= $2 AND block <= $3",
        sid,
        start // span,
        last // span,
    )
    changes = []
    for size, block, data in rows:
        parts = np.frombuffer(data, rollup.ROLLUP)
        # Buckets [ts, ts + size) inside [start, end] and before `before`.
        lo, hi = rollup.ceil(start, size), min(end - size + 1, before - size)
        if lo > hi:
            continue
        ts = parts["ts"]
        gone = (ts >= lo) & (ts <= hi)
        if gone.any():
            changes.append((size, block, parts[~gone]))
    await _store(conn, sid, changes)


async def record_expiry(conn: Conn, sids: Sequence[int], cutoff: int) -> None:
    """Raw points of `sids` before `cutoff` are about to be deleted (retention)."""
    await conn.execute(
        "INSERT INTO ts_expired (series_id, before) SELECT unnest($1::bigint[]), $2"
        " ON CONFLICT (series_id) DO UPDATE"
        " SET before = greatest(ts_expired.before, excluded.before)",
        list(sids),
        cutoff,
    )


async def forget_series(conn: Conn, entity_id: str) -> None:
    """The entity's data was deleted: its rollups and expiry go too."""
    series = "SELECT id FROM ts_series WHERE entity_id = $1"
    await conn.execute(f"DELETE FROM ts_rollups WHERE series_id IN ({series})", entity_id)
    await conn.execute(f"DELETE FROM ts_expired WHERE series_id IN ({series})", entity_id)


async def apply_level_ttls(
    conn: Conn,
    policy: RetentionPolicy,
    levels: Sequence[int],
    span: int,
    before: Callable[[Conn], Awaitable[None]] | None = None,
) -> None:
    """Delete each level's rollup rows older than its TTL, a whole block at a time, at
    a horizon aligned to both the level and the span (so no bucket is half deleted),
    and record the horizon for readers. One transaction per level, which first awaits
    `before(conn)` (the retention job's fencing check)."""
    for size, ttl in sorted(policy.levels.items()):
        if ttl <= 0 or size not in levels:
            continue
        align = math.lcm(size, span)
        horizon = (policy.now_ms - ttl) // align * align
        async with conn.transaction():
            if before is not None:
                await before(conn)
            await conn.execute(
                "UPDATE ts_rollup_levels SET expired_before = greatest(expired_before, $2)"
                " WHERE level = $1",
                size,
                horizon,
            )
            # Per series, through the primary key (a probe each, not a scan of all).
            await conn.execute(
                "DELETE FROM ts_rollups r USING ts_series s"
                " WHERE r.series_id = s.id AND r.level = $1 AND r.block < $2",
                size,
                horizon // span,
            )


__all__ = [
    "BLOCKS",
    "MIGRATION",
    "apply_level_ttls",
    "building",
    "built",
    "drop_expired",
    "expired_before",
    "forget_blocks",
    "forget_series",
    "record_expiry",
    "refresh",
    "sync_levels",
    "usable",
]
