"""SQLite rollups survive raw TTL, expire by level TTL, and are built for levels added later.

That answers from rollups equal answers from raw points, whatever was written,
rewritten, deleted and compacted, is checked on every backend that keeps rollups in
tests/contract/test_rollups.py.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

from iotmesh.core.settings import SqliteSettings
from iotmesh.core.types import Aggregation, Order, TsRecord
from iotmesh.storage.rollup import RetentionPolicy
from iotmesh.storage.sqlite.tsdb import SqliteTimeSeriesStore
from iotmesh.storage.timeseries import Query, SeriesWrite

AGGREGATIONS = [a for a in Aggregation if a is not Aggregation.NONE]


def test_rollups_are_used_and_outlive_raw_points(tmp_path: Path) -> None:
    """After raw points expire, aggregates at a level's multiples still answer from
    rollups; raw queries and other intervals see what is left."""
    store = SqliteTimeSeriesStore(tmp_path / "ts.db", SqliteSettings(), (10, 100))

    async def run() -> None:
        await store.open()
        try:
            records = [TsRecord(t, {"v": t % 7, "s": "x"}) for t in range(0, 1000, 3)]
            await store.write([SeriesWrite("d", records)])
            await store.compact()
            q = Query("d", ("v",), 0, 999, Aggregation.SUM, 100, 100, Order.ASC)
            before = await store.query(q)
            count = Query("d", ("s",), 0, 999, Aggregation.COUNT, 200, 100, Order.ASC)
            counted = await store.query(count)
            await store.apply_retention(RetentionPolicy(now_ms=1650, raw_ttl_ms=1000))
            await store.compact()
            # Raw points before 600 (1650 - 1000, aligned down to 100) are gone...
            raw = await store.query(Query("d", ("v",), 0, 999, limit=1000, order=Order.ASC))
            assert min(p.ts for p in raw["v"]) == 600
            # ...but their aggregates are not.
            assert await store.query(q) == before
            assert await store.query(count) == counted
            assert sum(p.value for p in counted["s"]) == len(records)
            # An interval no level divides reads raw points: only what is left.
            odd = Query("d", ("v",), 0, 999, Aggregation.COUNT, 7, 1000, Order.ASC)
            assert sum(p.value for p in (await store.query(odd))["v"]) == 400 // 3 + 1
            # A point older than the raw TTL when it arrives is left out of the rollups
            # (the raw points of its bucket are gone: they could not be recomputed).
            await store.write([SeriesWrite("d", [TsRecord(10, {"v": 1000})])])
            await store.compact()
            assert await store.query(q) == before
            # Deleting an expired range deletes the rollup buckets it covers whole.
            assert await store.delete("d", ["v"], 0, 250) == 1  # the late raw point
            await store.compact()
            after = await store.query(q)
            assert after["v"][0].ts == 200  # 200..299 was cut: it keeps its aggregate
            assert after["v"] == before["v"][2:]
            # Rollup TTL: whole blocks of 256 buckets expire.
            await store.apply_retention(RetentionPolicy(now_ms=30_000, levels={10: 1}))
            await store.compact()
        finally:
            await store.close()

    asyncio.run(run())
    db = sqlite3.connect(tmp_path / "ts.db")
    try:
        levels = {row[0] for row in db.execute("SELECT level FROM ts_rollup")}
    finally:
        db.close()
    assert levels == {100}


def test_expired_rollup_buckets_fall_back_to_raw_points(tmp_path: Path) -> None:
    """A level's TTL shorter than the raw TTL: old ranges are answered from raw points."""
    store = SqliteTimeSeriesStore(tmp_path / "ts.db", SqliteSettings(), (10,))

    async def run() -> None:
        await store.open()
        try:
            records = [TsRecord(t, {"v": t % 5}) for t in range(0, 10_000, 3)]
            await store.write([SeriesWrite("d", records)])
            await store.compact()
            queries = [
                Query("d", ("v",), start, 9999, agg, 20, 1000, Order.ASC)
                for start in (0, 1234, 5000)
                for agg in AGGREGATIONS
            ]
            before = [await store.query(q) for q in queries]
            # Buckets of 10 ms are kept 2 s: blocks (2.56 s each) before 7680 go.
            await store.apply_retention(RetentionPolicy(now_ms=10_000, levels={10: 2000}))
            await store.compact()
            assert [await store.query(q) for q in queries] == before
        finally:
            await store.close()

    asyncio.run(run())
    db = sqlite3.connect(tmp_path / "ts.db")
    try:
        (oldest,) = db.execute("SELECT min(block) FROM ts_rollup").fetchone()
        (horizon,) = db.execute("SELECT expired_before FROM ts_rollup_level").fetchone()
    finally:
        db.close()
    assert (oldest, horizon) == (3, 7680)


def test_levels_added_later_are_built_from_existing_data(tmp_path: Path) -> None:
    """Data written without rollups (an upgraded data dir, or levels configured later)
    is rolled up at the next open; a level no longer configured is dropped."""
    path = tmp_path / "ts.db"
    q = Query("d", ("v",), 0, 9999, Aggregation.SUM, 100, 1000, Order.ASC)

    async def run(levels: tuple[int, ...], write: bool) -> dict[str, Any]:
        store = SqliteTimeSeriesStore(path, SqliteSettings(), levels)
        await store.open()
        try:
            if write:
                records = [TsRecord(t, {"v": t}) for t in range(0, 10_000, 7)]
                await store.write([SeriesWrite("d", records)])
            await store.compact()
            return await store.query(q)
        finally:
            await store.close()

    def levels() -> set[int]:
        db = sqlite3.connect(path)
        try:
            return {row[0] for row in db.execute("SELECT DISTINCT level FROM ts_rollup")}
        finally:
            db.close()

    raw = asyncio.run(run((), write=True))
    assert levels() == set()
    assert asyncio.run(run((10, 100), write=False)) == raw
    assert levels() == {10, 100}
    assert asyncio.run(run((10,), write=False)) == raw
    assert levels() == {10}
