"""SQLite rollups: answers from rollups equal answers from raw points, and survive raw TTL.

Two real stores (writer processes and all) get the same operations: one keeps rollups
of 5, 20 and 100 ms buckets, the other none, so it answers every aggregation from raw
points. Hypothesis draws the operations: batches of points out of order and late,
rewrites of a ts with another value or kind, deletes of ranges, compaction (which
rolls up) at any point; then random ranges, intervals and aggregations must give the
same typed answers. Doubles are quarters, so sums are exact and equality is strict
(rounding is covered in test_rollup.py).
"""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iotmesh.core.settings import SqliteSettings
from iotmesh.core.types import Aggregation, Order, TsRecord
from iotmesh.storage.rollup import RetentionPolicy
from iotmesh.storage.sqlite.tsdb import SqliteTimeSeriesStore
from iotmesh.storage.timeseries import Query, SeriesWrite

LEVELS = (5, 20, 100)
AGGREGATIONS = [a for a in Aggregation if a is not Aggregation.NONE]
values = st.one_of(
    st.integers(-400, 400).map(lambda k: k / 4),
    st.integers(-(2**40), 2**40),  # with quarters: sums stay exact as doubles
    st.integers(-50, 50),
    st.booleans(),
    st.sampled_from(["a", "b"]),
)
writes = st.lists(
    st.tuples(st.integers(0, 700), st.dictionaries(st.sampled_from("xy"), values, min_size=1)),
    min_size=1,
    max_size=60,
)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("write"), writes),
        st.tuples(st.just("compact"), st.none()),
        st.tuples(st.just("delete"), st.tuples(st.integers(0, 700), st.integers(0, 120))),
    ),
    min_size=1,
    max_size=8,
)
queries = st.lists(
    st.tuples(
        st.integers(-10, 400),
        st.integers(0, 720),  # the range's length
        st.sampled_from(AGGREGATIONS),
        st.sampled_from([5, 10, 20, 40, 60, 100, 200, 300, 7]),
        st.sampled_from(list(Order)),
        st.integers(1, 200),
    ),
    min_size=3,
    max_size=10,
)


class Pair:
    """A store with rollups and one without, on one event loop."""

    def __init__(self, path: Path) -> None:
        small = SqliteSettings(chunk_max_points=16, compact_min_chunks=3)
        self.runner = asyncio.Runner()
        self.rolled = SqliteTimeSeriesStore(path / "rolled.db", small, LEVELS)
        self.raw = SqliteTimeSeriesStore(path / "raw.db", small)
        self.path = path / "rolled.db"
        self.entities = itertools.count()
        for store in (self.rolled, self.raw):
            self.runner.run(store.open())

    def both(self, op: str, *args: Any) -> list[Any]:
        return [self.runner.run(getattr(s, op)(*args)) for s in (self.rolled, self.raw)]

    def close(self) -> None:
        for store in (self.rolled, self.raw):
            self.runner.run(store.close())
        self.runner.close()


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    p = Pair(tmp_path_factory.mktemp("rollups"))
    try:
        yield p
    finally:
        p.close()


def typed(result: dict[str, Any]) -> dict[str, list[tuple[int, type, Any]]]:
    return {k: [(p.ts, type(p.value), p.value) for p in v] for k, v in result.items()}


@settings(max_examples=100, deadline=None)
@given(ops, queries)
def test_rollup_answers_equal_raw_answers(pair: Pair, operations: Any, asked: Any) -> None:
    entity = f"e{next(pair.entities)}"
    for op, arg in operations:
        if op == "write":
            records = [TsRecord(ts, vals) for ts, vals in arg]
            pair.both("write", [SeriesWrite(entity, records)])
        elif op == "compact":
            pair.both("compact")
        else:
            start, length = arg
            deleted = pair.both("delete", entity, ["x", "y"], start, start + length)
            assert deleted[0] == deleted[1]
    for settle in (False, True):  # with work pending, then settled (all rolled up)
        if settle:
            pair.both("compact")
        for start, length, agg, interval, order, limit in asked:
            q = Query(entity, ("x", "y"), start, start + length, agg, interval, limit, order)
            rolled, raw = pair.both("query", q)
            assert typed(rolled) == typed(raw), q


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
