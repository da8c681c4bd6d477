"""PostgreSQL rollups (`storage/postgres/tsrollups.py`): they outlive raw points, expire
by level TTL (where older ranges fall back to raw points), and are built for chunks
packed before the schema had them (the upgrade from schema 2) or before a level was
configured; a level no longer configured is dropped.

That rollup answers equal raw answers whatever was written, rewritten, deleted and
compacted is the property test in tests/contract/test_rollups.py.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np

from iotmesh.core.types import Aggregation, Order, TsPoint, TsRecord
from iotmesh.storage import aggregate
from iotmesh.storage.points import Points
from iotmesh.storage.postgres import PostgresTimeSeriesStore, tschunks, tsschema
from iotmesh.storage.postgres.connection import migrate, schema_version
from iotmesh.storage.postgres.tschunks import CHUNK_SPAN_MS
from iotmesh.storage.rollup import RetentionPolicy
from iotmesh.storage.timeseries import Query, SeriesWrite
from tests.postgres import PgServer

H = CHUNK_SPAN_MS
MINUTE = 60_000
AGGREGATIONS = [a for a in Aggregation if a is not Aggregation.NONE]


async def _stop_background(store: PostgresTimeSeriesStore) -> None:
    """Stop the compaction task, so the test decides when chunks and rollups change."""
    task = store._compactor
    assert task is not None
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    store._compactor = None


async def _fetch(store: PostgresTimeSeriesStore, sql: str) -> list[Any]:
    async with store.pool.acquire() as conn:
        return list(await conn.fetch(sql))


def per(key: str, start: int, end: int, agg: Aggregation, interval: int) -> Query:
    return Query("d", (key,), start, end, agg, interval, 100_000, Order.ASC)


def modelled(model: dict[int, Any], q: Query) -> list[TsPoint]:
    """What raw points answer to `q`."""
    ts = sorted(t for t in model if q.start_ts <= t <= q.end_ts)
    points = Points.from_values(ts, [model[t] for t in ts])
    return aggregate.to_ts_points(aggregate.aggregate(points, q.agg, q.interval_ms), q.order, 10**6)


async def test_rollups_outlive_raw_points_and_expire_by_level(
    postgres: PgServer, tmp_path: Path
) -> None:
    """After raw points expire, aggregates at a level's multiples still answer from
    rollups; a late point older than the expiry stays out of them; a delete of an
    expired range deletes the buckets it covers whole; a level's TTL deletes its blocks
    and reads before its horizon fall back to the raw points that are left."""
    store = PostgresTimeSeriesStore(postgres.settings(str(tmp_path)), (MINUTE, H))
    await store.open()
    try:
        await _stop_background(store)
        records = [TsRecord(t, {"v": t // 1000 % 7, "s": "x"}) for t in range(0, 6 * H, 10_000)]
        await store.write([SeriesWrite("d", records)])
        await store.compact(everything=True)
        hourly = per("v", 0, 6 * H - 1, Aggregation.SUM, H)
        counted = per("s", 0, 6 * H - 1, Aggregation.COUNT, 2 * H)
        minutes = per("v", 0, 6 * H - 1, Aggregation.MAX, MINUTE)
        before = [await store.query(q) for q in (hourly, counted, minutes)]

        # Raw TTL: the cutoff 3.5 h is aligned down to the coarsest level, 3 h.
        await store.apply_retention(RetentionPolicy(now_ms=7 * H + H // 2, raw_ttl_ms=4 * H))
        raw = await store.query(Query("d", ("v",), 0, 6 * H, limit=1, order=Order.ASC))
        assert raw["v"][0].ts == 3 * H
        assert [await store.query(q) for q in (hourly, counted, minutes)] == before
        assert sum(p.value for p in before[1]["s"]) == len(records)
        # An interval no level divides reads raw points: only what is left.
        odd = per("s", 0, 6 * H - 1, Aggregation.COUNT, 45_000)
        assert sum(p.value for p in (await store.query(odd))["s"]) == 3 * H // 10_000

        # A point older than the raw expiry when it arrives is left out of the rollups
        # (the raw points of its buckets are gone: they could not be recomputed).
        await store.write([SeriesWrite("d", [TsRecord(10, {"v": 1000})])])
        await store.compact(everything=True)
        assert await store.query(hourly) == before[0]

        # Deleting an expired range deletes the rollup buckets it covers whole.
        assert await store.delete("d", ["v"], 0, H + H // 2) == 1  # the late raw point
        after = await store.query(hourly)
        assert after["v"] == before[0]["v"][1:]  # [H, 2H) was cut: it keeps its aggregate
        cut = [p for p in before[2]["v"] if p.ts >= H + H // 2]
        assert (await store.query(minutes))["v"] == cut

        # Level TTL: the minute level before 4 h goes (whole blocks), the hour level stays.
        await store.apply_retention(RetentionPolicy(now_ms=5 * H, levels={MINUTE: H - 1}))
        oldest = await _fetch(
            store,
            "SELECT level, min(block) FROM ts_rollups WHERE series_id ="
            " (SELECT id FROM ts_series WHERE key = 'v') GROUP BY 1",
        )
        assert dict(oldest) == {MINUTE: 4, H: 1}  # the delete took block 0 of the hours
        horizons = await _fetch(store, "SELECT level, expired_before FROM ts_rollup_levels")
        assert dict(horizons) == {MINUTE: 4 * H, H: -(2**63)}
        # Before the horizon, per-minute answers come from the raw points left (from 3 h).
        assert (await store.query(minutes))["v"] == [p for p in cut if p.ts >= 3 * H]
        assert await store.query(hourly) == after
    finally:
        await store.close()


async def test_expired_level_falls_back_to_raw_points(postgres: PgServer, tmp_path: Path) -> None:
    """A level's TTL shorter than the raw TTL: old ranges are answered from raw points,
    with the same answers as before."""
    store = PostgresTimeSeriesStore(postgres.settings(str(tmp_path)), (MINUTE,))
    await store.open()
    try:
        await _stop_background(store)
        model = {t: t // 1000 % 5 for t in range(0, 6 * H, 7_000)}
        await store.write([SeriesWrite("d", [TsRecord(t, {"v": v}) for t, v in model.items()])])
        await store.compact()  # the newest block stays as rows: pending buckets
        queries = [
            per("v", start, 6 * H - 1, agg, 2 * MINUTE)
            for start in (0, 1234, 4 * H + 5)
            for agg in AGGREGATIONS
        ]
        for q in queries:
            assert (await store.query(q))["v"] == modelled(model, q)
        await store.apply_retention(RetentionPolicy(now_ms=6 * H, levels={MINUTE: 2 * H}))
        assert dict(await _fetch(store, "SELECT level, expired_before FROM ts_rollup_levels")) == {
            MINUTE: 4 * H
        }
        for q in queries:
            assert (await store.query(q))["v"] == modelled(model, q)
    finally:
        await store.close()


async def test_upgrade_builds_rollups_of_existing_chunks(
    postgres: PgServer, tmp_path: Path
) -> None:
    """A schema of version 2 (chunks, no rollups, as the previous release made it) gains
    the rollup tables; the chunks it has are rolled up by the catch-up steps, after
    which answers come from rollups (they survive the raw points' expiry). A level
    configured later is built the same way; one no longer configured is dropped."""
    settings = postgres.settings(str(tmp_path), partition_interval_s=86400)
    schema = settings.schema_name
    model = {t: float(t // 1000 % 11) for t in range(0, 5 * H, 5_000)}
    conn = await asyncpg.connect(postgres.url, server_settings={"search_path": schema})
    try:
        assert await migrate(conn, schema, tsschema.COMPONENT, tsschema.migrations(settings)[:2])
        parts = await tsschema.Partitions.load(conn)
        await parts.create(conn, parts.missing(np.array(list(model), np.int64)))
        await conn.execute("INSERT INTO ts_series (entity_id, key) VALUES ('d', 'v')")
        await conn.executemany(
            "INSERT INTO ts_points (series_id, ts, kind, v_d) VALUES (1, $1, 0, $2)",
            list(model.items()),
        )
        newest = max(model)
        await conn.execute(
            "INSERT INTO ts_latest (series_id, ts, kind, v_d) VALUES (1, $1, 0, $2)",
            newest,
            model[newest],
        )
        for block in range(4):  # packed as release 2 packed them: no rollups
            async with conn.transaction():
                await tschunks.compact_block(conn, 1, block, H, levels=())
    finally:
        await conn.close()

    queries = [per("v", 0, 5 * H - 1, agg, 2 * MINUTE) for agg in AGGREGATIONS]
    queries.append(per("v", 0, 5 * H, Aggregation.AVG, H))
    # A range cutting a level bucket reads the cut part from raw points: checked while
    # they are there.
    cut = per("v", 1234, 5 * H - 1, Aggregation.SUM, 2 * MINUTE)

    async def opened(levels: tuple[int, ...]) -> PostgresTimeSeriesStore:
        store = PostgresTimeSeriesStore(settings, levels)
        await store.open()
        await _stop_background(store)
        return store

    store = await opened((MINUTE,))
    try:
        assert await _fetch(store, "SELECT level, built_through FROM ts_rollup_levels") == [
            (MINUTE, 0)
        ]
        for q in [*queries, cut]:  # not built yet: raw points answer
            assert (await store.query(q))["v"] == modelled(model, q)
        await store.compact()  # builds the level, then packs (the newest block stays rows)
        assert await _fetch(store, "SELECT built_through FROM ts_rollup_levels") == [(None,)]
        blocks = await _fetch(store, "SELECT block FROM ts_rollups ORDER BY 1")
        assert [b for (b,) in blocks] == [0, 1, 2, 3]
        for q in [*queries, cut]:
            assert (await store.query(q))["v"] == modelled(model, q)
    finally:
        await store.close()

    store = await opened((MINUTE, H))  # an hour level added to existing chunks
    try:
        await store.compact()
        levels = await _fetch(store, "SELECT level, count(*) FROM ts_rollups GROUP BY 1")
        assert dict(levels) == {MINUTE: 4, H: 4}
        # Everything before 4 h expires as raw points (every chunk: the newest block is
        # rows); the rollups still answer for it.
        await store.apply_retention(RetentionPolicy(now_ms=5 * H, raw_ttl_ms=H))
        assert await _fetch(store, "SELECT 1 FROM ts_chunks") == []
        for q in queries:
            assert (await store.query(q))["v"] == modelled(model, q)
    finally:
        await store.close()

    store = await opened((H,))  # the minute level dropped
    try:
        levels = await _fetch(store, "SELECT DISTINCT level FROM ts_rollups")
        assert levels == [(H,)]
        assert (await store.query(queries[-1]))["v"] == modelled(model, queries[-1])
        async with store.pool.acquire() as c:
            assert await schema_version(c, tsschema.COMPONENT) == 4  # + fences (3) and rollups (4)
    finally:
        await store.close()
