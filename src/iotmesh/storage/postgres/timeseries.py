"""`PostgresTimeSeriesStore`: the time-series store contract on PostgreSQL (asyncpg).

The schema and its partitions are in `tsschema.py`, the reads and the aggregation SQL in
`tsquery.py`.

Writes. A `write` is one transaction: the batch's points are flattened here into
columns (series id, ts, kind, one column per value type), the last write of each
(series, ts) within the batch kept, sorted by (series, ts) so that concurrent writers
lock rows in one order, and sent as arrays: one `INSERT ... SELECT FROM unnest(...)
ON CONFLICT (series_id, ts) DO UPDATE` for the points (a rewrite replaces the point, of
any kind), one such upsert of `ts_latest` with the newest point of each series (kept
only where it is at least as new as the stored one). Two round trips for any number of
points; before them, series ids come from a cache (new ones are inserted and read back
in one statement pair, committed on their own: an unused series row is harmless), and
missing partitions are created. PostgreSQL's commit (synchronous_commit on, the
default) makes the batch durable before `write` returns.

Chunks (`tschunks.py`): a background task (`compact`) moves the rows of each series'
older blocks (an hour each) into `ts_chunks`, one row of packed arrays per series per
block, so that a query over 1M points reads ~280 rows instead of 1M. The block of a
series' newest point stays as rows while it is written to.

Reads run in one read-only REPEATABLE READ transaction per call, so the keys of one
query see the same commits and never half a batch, nor a block both as rows and chunk.
A key without chunks in the range is answered by SQL (`tsquery.raw`/`aggregated`); one
with chunks is read into numpy columns and answered like the SQLite store's
(`tsquery.chunked`).

Deletes remove rows and cut points out of chunks, and recompute `ts_latest` of the
series whose newest point was deleted from the newest remaining one (an index probe per
series, in rows and chunks). A deleted device's points and latest
values are deleted; its `ts_series` rows stay (a few bytes each), so series ids cached
by other instances stay valid.

Error handling: see `connection.py`. Connection errors and server failures are
`StorageError` (the writer retries), data PostgreSQL refuses (a key holding NUL, a ts
outside int64) is `PayloadError`, like the SQLite store.

Resource handling: `open` creates the pool, migrates the schema, loads the partition
list and starts the compaction task; `close` stops that task (a compaction in progress
rolls back), waits for a write in progress, then closes the pool (waiting for queries
in progress). A compaction that fails (server away) is logged and retried later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Any

import asyncpg
import msgspec
import numpy as np

from iotmesh.core.errors import PayloadError, StorageError
from iotmesh.core.settings import PostgresSettings
from iotmesh.core.types import Aggregation, TsPoint
from iotmesh.storage import aggregate
from iotmesh.storage.points import INT64_MAX, INT64_MIN, Kind, classify
from iotmesh.storage.postgres import tschunks, tsquery, tsschema
from iotmesh.storage.postgres.connection import Conn, create_pool, fenced, migrate, translated
from iotmesh.storage.rollup import RETENTION_FENCE, RetentionPolicy
from iotmesh.storage.timeseries import Query, SeriesWrite

log = logging.getLogger(__name__)

_WHAT = "time-series store"

# Seconds the compaction task waits at least when it found nothing to compact (or
# failed); more when the search took long (many series).
COMPACT_IDLE_S = 5.0
_json = msgspec.json.Encoder()

# Series ids cached per entity; the cache is dropped whole when it holds more than this.
MAX_CACHED_SERIES = 1_000_000

_UPSERT_POINTS = """
    INSERT INTO ts_points (series_id, ts, kind, v_d, v_l, v_b, v_s, v_j)
    SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::smallint[], $4::float8[],
                         $5::bigint[], $6::boolean[], $7::text[], $8::json[])
    ON CONFLICT (series_id, ts) DO UPDATE SET kind = excluded.kind, v_d = excluded.v_d,
        v_l = excluded.v_l, v_b = excluded.v_b, v_s = excluded.v_s, v_j = excluded.v_j
"""
_UPSERT_LATEST = """
    INSERT INTO ts_latest AS l (series_id, ts, kind, v_d, v_l, v_b, v_s, v_j)
    SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::smallint[], $4::float8[],
                         $5::bigint[], $6::boolean[], $7::text[], $8::json[])
    ON CONFLICT (series_id) DO UPDATE SET ts = excluded.ts, kind = excluded.kind,
        v_d = excluded.v_d, v_l = excluded.v_l, v_b = excluded.v_b, v_s = excluded.v_s,
        v_j = excluded.v_j
    WHERE excluded.ts >= l.ts
"""
_NEW_SERIES = """
    INSERT INTO ts_series (entity_id, key)
    SELECT * FROM unnest($1::text[], $2::text[]) ORDER BY 1, 2
    ON CONFLICT DO NOTHING
"""
_SERIES_IDS = """
    SELECT s.entity_id, s.key, s.id FROM ts_series s
    JOIN unnest($1::text[], $2::text[]) AS u (entity_id, key)
      ON s.entity_id = u.entity_id AND s.key = u.key
"""
_KEY_IDS = "SELECT key, id FROM ts_series WHERE entity_id = $1 AND key = ANY($2::text[])"
_LATEST = f"""
    SELECT s.key, l.ts, l.{tsquery.VALUE_COLUMNS.replace(", ", ", l.")}
    FROM ts_series s JOIN ts_latest l ON l.series_id = s.id WHERE s.entity_id = $1
"""
_INSERT_LATEST = """
    INSERT INTO ts_latest (series_id, ts, kind, v_d, v_l, v_b, v_s, v_j)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
"""


class PostgresTimeSeriesStore:
    """A `TimeSeriesStore` on PostgreSQL 13+ (tested on 15), TimescaleDB when present."""

    def __init__(self, settings: PostgresSettings) -> None:
        self.settings = settings
        self._pool: asyncpg.Pool | None = None
        self._partitions: tsschema.Partitions | None = None
        self._span = tschunks.CHUNK_SPAN_MS
        self._compactor: asyncio.Task[None] | None = None
        self._series: dict[str, dict[str, int]] = {}
        self._cached = 0
        # Held by a write; `close` takes it, so it waits for a write in progress.
        self._writing = asyncio.Lock()

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StorageError("time-series store is not open")
        return self._pool

    async def open(self) -> None:
        pool = await create_pool(self.settings, _WHAT)
        try:
            async with translated(_WHAT), pool.acquire() as conn:
                await migrate(
                    conn,
                    self.settings.schema_name,
                    tsschema.COMPONENT,
                    tsschema.migrations(self.settings),
                )
                self._partitions = await tsschema.Partitions.load(conn)
                span = await conn.fetchval("SELECT value FROM ts_meta WHERE name = 'chunk_span_ms'")
                self._span = int(span)
        except BaseException:
            await pool.close()
            raise
        self._pool = pool
        self._compactor = asyncio.create_task(self._compact_forever(), name="pg-ts-compaction")

    async def close(self) -> None:
        task, self._compactor = self._compactor, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        async with self._writing:
            pool, self._pool = self._pool, None
            if pool is not None:
                await pool.close()

    # -- writes --------------------------------------------------------------------

    async def write(self, batch: Sequence[SeriesWrite]) -> None:
        async with self._writing:
            pool = self.pool
            async with translated(_WHAT), pool.acquire() as conn:
                await self._resolve(conn, batch)
                points, latest, stamps = self._columns(batch)
                if not points[0]:
                    return
                assert self._partitions is not None
                if missing := self._partitions.missing(stamps):
                    await self._partitions.create(conn, missing)
                async with conn.transaction():
                    await conn.execute(_UPSERT_POINTS, *points)
                    await conn.execute(_UPSERT_LATEST, *latest)

    async def _resolve(self, conn: Conn, batch: Sequence[SeriesWrite]) -> None:
        """Put the id of every series of `batch` in the cache (creating new series)."""
        if self._cached > MAX_CACHED_SERIES:
            self._series.clear()
            self._cached = 0
        new: dict[tuple[str, str], None] = {}
        for series in batch:
            known = self._series.get(series.entity_id, {})
            for record in series.records:
                for key in record.values:
                    if key not in known:
                        new[series.entity_id, key] = None
        if not new:
            return
        entities = [entity for entity, _ in new]
        keys = [key for _, key in new]
        await conn.execute(_NEW_SERIES, entities, keys)
        for entity, key, sid in await conn.fetch(_SERIES_IDS, entities, keys):
            self._series.setdefault(entity, {})[key] = sid
            self._cached += 1

    def _columns(
        self, batch: Sequence[SeriesWrite]
    ) -> tuple[list[list[Any]], list[list[Any]], np.ndarray[Any, np.dtype[np.int64]]]:
        """The batch as columns: (points, latest of each series, the point timestamps).

        Raises:
            PayloadError: a timestamp outside int64.
        """
        last: dict[tuple[int, int], Any] = {}
        for series in batch:
            ids = self._series.get(series.entity_id, {})  # none: the records have no values
            for record in series.records:
                ts = record.ts
                if not INT64_MIN <= ts <= INT64_MAX:
                    raise PayloadError(
                        f"a telemetry value or timestamp cannot be stored: ts {ts} is outside int64"
                    )
                for key, v in record.values.items():
                    last[ids[key], ts] = v
        order = sorted(last)
        columns: list[list[Any]] = [[], [], [], [], [], [], [], []]
        sids, stamps, kinds, v_d, v_l, v_b, v_s, v_j = columns
        for point in order:
            kind, v = classify(last[point])
            sids.append(point[0])
            stamps.append(point[1])
            kinds.append(kind)
            v_d.append(v if kind is Kind.DOUBLE else None)
            v_l.append(v if kind is Kind.LONG else None)
            v_b.append(v if kind is Kind.BOOL else None)
            if kind is Kind.STRING and "\x00" not in v:
                v_s.append(v)
                v_j.append(None)
            else:
                v_s.append(None)
                v_j.append(_json.encode(v).decode() if kind >= Kind.STRING else None)
        # The newest point of each series: the last of its run (sorted by series, ts).
        ends = [i for i in range(len(sids)) if i + 1 == len(sids) or sids[i + 1] != sids[i]]
        latest = [[col[i] for i in ends] for col in columns]
        return columns, latest, np.array(stamps, np.int64)

    # -- reads ---------------------------------------------------------------------

    async def query(self, query: Query) -> dict[str, list[TsPoint]]:
        q = query
        aggregate.validate(q.start_ts, q.end_ts, q.agg, q.interval_ms, q.limit)
        keys = list(dict.fromkeys(q.keys))
        if not keys:
            return {}
        out: dict[str, list[TsPoint]] = {}
        async with (
            translated(_WHAT),
            self.pool.acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            series = await tschunks.series_with_chunks(
                conn, q.entity_id, keys, q.start_ts, q.end_ts, self._span
            )
            for key in keys:
                if key not in series:
                    continue
                sid, chunked = series[key]
                if chunked:
                    found = await tsquery.chunked(
                        conn,
                        sid,
                        q.start_ts,
                        q.end_ts,
                        q.agg,
                        q.interval_ms,
                        q.order,
                        q.limit,
                        self._span,
                    )
                elif q.agg is Aggregation.NONE:
                    found = await tsquery.raw(conn, sid, q.start_ts, q.end_ts, q.order, q.limit)
                else:
                    found = await tsquery.aggregated(
                        conn,
                        sid,
                        q.start_ts,
                        q.end_ts,
                        q.agg,
                        q.interval_ms,
                        q.order,
                        q.limit,
                    )
                if found:
                    out[key] = found
        return out

    async def latest(self, entity_id: str, keys: Sequence[str] | None = None) -> dict[str, TsPoint]:
        if keys is not None and not keys:
            return {}
        sql = _LATEST
        args: list[Any] = [entity_id]
        if keys is not None:
            sql += " AND s.key = ANY($2::text[])"
            args.append(list(keys))
        async with translated(_WHAT), self.pool.acquire() as conn:
            rows = await conn.fetch(sql, *args)
        return {r[0]: TsPoint(r[1], tsquery.value(r, 2)) for r in rows}

    async def keys(self, entity_id: str) -> list[str]:
        async with translated(_WHAT), self.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT s.key FROM ts_series s JOIN ts_latest l ON l.series_id = s.id"
                " WHERE s.entity_id = $1 ORDER BY s.key",
                entity_id,
            )
        return [r[0] for r in rows]

    # -- deletes -------------------------------------------------------------------

    async def delete(self, entity_id: str, keys: Sequence[str], start_ts: int, end_ts: int) -> int:
        if not keys or start_ts > end_ts:
            return 0
        async with translated(_WHAT), self.pool.acquire() as conn, conn.transaction():
            sids = [r[1] for r in await conn.fetch(_KEY_IDS, entity_id, list(set(keys)))]
            if not sids:
                return 0
            # The series' chunk locks before any row lock, in one order, as compaction
            # takes them: the other way round, the two could deadlock.
            await tschunks.lock_series(conn, sids)
            deleted = await conn.fetch(
                "DELETE FROM ts_points WHERE series_id = ANY($1::bigint[])"
                " AND ts >= $2 AND ts <= $3 RETURNING series_id, ts",
                sids,
                start_ts,
                end_ts,
            )
            count = len(deleted)
            rows_ts: dict[int, list[int]] = {}
            for sid, ts in deleted:
                rows_ts.setdefault(sid, []).append(ts)
            count += await tschunks.delete_range(
                conn,
                sids,
                start_ts,
                end_ts,
                self._span,
                {sid: np.array(ts, np.int64) for sid, ts in rows_ts.items()},
            )
            if count:
                stale = await conn.fetch(
                    "DELETE FROM ts_latest WHERE series_id = ANY($1::bigint[])"
                    " AND ts >= $2 AND ts <= $3 RETURNING series_id",
                    sids,
                    start_ts,
                    end_ts,
                )
                for (sid,) in stale:
                    found = await tschunks.newest(conn, sid)
                    if found is not None:
                        ts, v = found
                        await conn.execute(_INSERT_LATEST, sid, ts, *tschunks.value_columns(v))
        return count

    async def delete_entity(self, entity_id: str) -> None:
        series = "SELECT id FROM ts_series WHERE entity_id = $1"
        async with translated(_WHAT), self.pool.acquire() as conn, conn.transaction():
            await conn.execute(f"DELETE FROM ts_points WHERE series_id IN ({series})", entity_id)
            await conn.execute(f"DELETE FROM ts_latest WHERE series_id IN ({series})", entity_id)
            await conn.execute(f"DELETE FROM ts_chunks WHERE series_id IN ({series})", entity_id)

    # -- compaction ----------------------------------------------------------------

    async def compact(self, *, everything: bool = False) -> int:
        """Compact until nothing is left to; return the points moved into chunks.

        Args:
            everything: also the block of each series' newest point (tests, benchmarks:
                every point in chunks); by default that block stays as rows.
        """
        total = 0
        while True:
            found, moved = await self._compact_round(everything)
            total += moved
            if not found:
                return total

    async def _compact_round(self, everything: bool) -> tuple[int, int]:
        """One pass over the series with something to compact, a block each: (blocks
        found, points moved; none when another instance compacted them meanwhile)."""
        moved = 0
        async with translated(_WHAT), self.pool.acquire() as conn:
            found = await tschunks.candidates(conn, self._span, everything)
            for sid, block in found:
                async with conn.transaction():
                    moved += await tschunks.compact_block(conn, sid, block, self._span)
        return len(found), moved

    async def _compact_forever(self) -> None:
        while True:
            started = time.monotonic()
            try:
                found, _ = await self._compact_round(everything=False)
            except StorageError as exc:
                log.warning("compaction of the PostgreSQL time series failed: %s", exc)
                found = 0
            except Exception:
                # A bug here must not stop the store: writes and reads work without
                # compaction (slower); say so loudly and try again later.
                log.exception("compaction of the PostgreSQL time series failed")
                found = 0
            # Idle, the candidate search (an index probe per series) runs at most ~10%
            # of the time, however many series there are.
            idle = max(COMPACT_IDLE_S, 10 * (time.monotonic() - started))
            await asyncio.sleep(0 if found else idle)

    async def apply_retention(self, policy: RetentionPolicy) -> None:
        """Delete raw points past their TTL; no rollups on PostgreSQL yet.

        Series are grouped by their TTL (`RetentionPolicy.raw_ttl`: the default, a key's or
        a device's rule), and each group is one transaction: a DELETE of rows, one of the
        chunks wholly before the cutoff, and a rewrite of the chunks the cutoff cuts, so a
        pass costs a few statements per distinct TTL, not per series. Latest values stay
        (they are the current state). With a `fencing_token` (a leader-elected job) each
        transaction first records it in `fences`, and fails (rolls back) when a newer
        leader's token is there already.

        Raises:
            StorageError: the server failed, or the policy's fencing token is stale.
        """
        if not (policy.raw_ttl_ms or policy.keys or policy.entities):
            return
        async with translated(_WHAT), self.pool.acquire() as conn:
            series = await conn.fetch("SELECT id, entity_id, key FROM ts_series")
            by_ttl: dict[int, list[int]] = {}
            for sid, entity_id, key in series:
                ttl = policy.raw_ttl(entity_id, key)
                if ttl > 0:
                    by_ttl.setdefault(ttl, []).append(sid)
            for ttl, sids in sorted(by_ttl.items()):
                cutoff = policy.now_ms - ttl
                async with conn.transaction():
                    if policy.fencing_token is not None:
                        await fenced(conn, RETENTION_FENCE, policy.fencing_token)
                    await tschunks.lock_series(conn, sids)
                    await conn.execute(
                        "DELETE FROM ts_points WHERE series_id = ANY($1::bigint[]) AND ts < $2",
                        sids,
                        cutoff,
                    )
                    await tschunks.expire(conn, sids, cutoff, self._span)


__all__ = ["PostgresTimeSeriesStore"]
