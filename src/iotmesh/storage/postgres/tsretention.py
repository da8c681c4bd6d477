"""Retention of the PostgreSQL time-series store: raw TTLs, and the TTL of each rollup level.

Raw points: series are grouped by their cutoff (`RetentionPolicy.raw_cutoff`: the
TTL rule that applies to each, aligned down to the coarsest rollup level, so that no
rollup bucket is half expired), and each group is one transaction: the rows older than
the cutoff are packed into their chunks first (so their aggregates reach the rollups),
the cutoff is recorded per series (`tsrollups.record_expiry`: the rollups keep the
buckets before it), then the chunks wholly before it are deleted in one statement and
the one it cuts is rewritten. A pass costs a few statements per distinct cutoff, plus
the packing of rows that old (late points, usually none). Latest values stay (they are
the current state).

Rollup levels: `tsrollups.apply_level_ttls`.

Fencing: with `policy.fencing_token` (the job of an elected leader, `iotmesh serve`)
every transaction first records the token in `fences` (`connection.fenced`), so a deposed
leader that wakes up has its transaction rolled back instead of deleting anything.
"""

from __future__ import annotations

from collections.abc import Sequence

from iotmesh.storage.postgres import tschunks, tsrollups
from iotmesh.storage.postgres.connection import Conn, fenced
from iotmesh.storage.rollup import RETENTION_FENCE, RetentionPolicy

# Per series of $1, the blocks holding a row older than $2 (floored, as `block_of`).
_OLD_ROW_BLOCKS = """
    SELECT DISTINCT series_id,
        CASE WHEN ts >= 0 THEN ts / $3 ELSE (ts + 1) / $3 - 1 END
    FROM ts_points WHERE series_id = ANY($1::bigint[]) AND ts < $2
"""


async def apply(conn: Conn, policy: RetentionPolicy, span: int, levels: Sequence[int]) -> None:
    """Expire what `policy` says has expired (see the module docstring).

    Raises:
        StorageError: the policy's fencing token is stale (a newer leader ran a pass).
    """

    async def fence(conn: Conn) -> None:
        if policy.fencing_token is not None:
            await fenced(conn, RETENTION_FENCE, policy.fencing_token)

    align = max(levels, default=1)
    if policy.raw_ttl_ms or policy.keys or policy.entities:
        by_cutoff: dict[int, list[int]] = {}
        for sid, entity_id, key in await conn.fetch("SELECT id, entity_id, key FROM ts_series"):
            cutoff = policy.raw_cutoff(entity_id, key, align)
            if cutoff is not None:
                by_cutoff.setdefault(cutoff, []).append(sid)
        for cutoff, sids in sorted(by_cutoff.items()):
            async with conn.transaction():
                await fence(conn)
                await _expire_raw(conn, sids, cutoff, span, levels)
    await tsrollups.apply_level_ttls(conn, policy, levels, span, before=fence)


async def _expire_raw(
    conn: Conn, sids: list[int], cutoff: int, span: int, levels: Sequence[int]
) -> None:
    await tschunks.lock_series(conn, sids)
    if levels:
        for sid, block in await conn.fetch(_OLD_ROW_BLOCKS, sids, cutoff, span):
            await tschunks.compact_block(conn, sid, block, span, levels=levels)
    await tsrollups.record_expiry(conn, sids, cutoff)
    await conn.execute(
        "DELETE FROM ts_points WHERE series_id = ANY($1::bigint[]) AND ts < $2", sids, cutoff
    )
    await tschunks.expire(conn, sids, cutoff, span, levels=levels)


__all__ = ["apply"]
