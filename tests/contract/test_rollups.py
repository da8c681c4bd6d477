"""Rollups, on every backend that keeps them: answers from rollups equal answers from raw points.

Two real stores of one backend get the same operations: one keeps rollups of 5, 20 and
100 ms buckets, the other none, so it answers every aggregation from raw points.
Hypothesis draws the operations: batches of points out of order and late, rewrites of
a ts with another value or kind, deletes of ranges, compaction (which rolls up) at any
point; then random ranges, intervals and aggregations must give the same typed
answers. Doubles are quarters, so sums are exact and equality is strict (rounding is
covered in tests/unit/storage/test_rollup.py).

SQLite rolls up in its writer process (`sqlite/rollups.py`); PostgreSQL keeps rollups
per chunk block (`postgres/tsrollups.py`), here with blocks of 50 ms so that the
levels cover the three cases: 5 ms divides a block, 20 ms buckets straddle block
edges, 100 ms buckets are two blocks each. Its background compaction runs too, at any
moment between the operations.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings

from iotmesh.core.settings import SqliteSettings
from iotmesh.core.types import TsRecord
from iotmesh.storage.postgres import PostgresTimeSeriesStore
from iotmesh.storage.sqlite.tsdb import SqliteTimeSeriesStore
from iotmesh.storage.timeseries import Query, SeriesWrite, TimeSeriesStore
from tests.postgres import PgServer
from tests.rollup_strategies import LEVELS, operations
from tests.rollup_strategies import queries as rollup_queries

PG_SPAN_MS = 50
ops = operations("compact", max_writes=60, max_ops=8)
queries = rollup_queries(max_size=10)


async def compact(store: TimeSeriesStore, *, settle: bool) -> None:
    """A compaction step: on PostgreSQL, the block of each series' newest point stays as
    rows (pending buckets) unless settling."""
    if isinstance(store, PostgresTimeSeriesStore):
        await store.compact(everything=settle)
    else:
        assert isinstance(store, SqliteTimeSeriesStore)
        await store.compact()


async def set_chunk_span(store: PostgresTimeSeriesStore, span_ms: int) -> None:
    """Give a fresh PostgreSQL store (no chunks yet) blocks of `span_ms` from its next
    open on (the span is recorded in `ts_meta` when the schema is made)."""
    async with store.pool.acquire() as conn:
        await conn.execute(
            "UPDATE ts_meta SET value = $1 WHERE name = 'chunk_span_ms'", str(span_ms)
        )


class Pair:
    """A store with rollups and one without, of one backend, on one event loop."""

    def __init__(self, rolled: TimeSeriesStore, raw: TimeSeriesStore) -> None:
        self.runner = asyncio.Runner()
        self.rolled, self.raw = rolled, raw
        self.entities = itertools.count()
        for store in (self.rolled, self.raw):
            self.runner.run(store.open())
        if isinstance(rolled, PostgresTimeSeriesStore):
            self.runner.run(set_chunk_span(rolled, PG_SPAN_MS))
            self.runner.run(rolled.close())
            self.runner.run(rolled.open())

    def both(self, op: str, *args: Any) -> list[Any]:
        return [self.runner.run(getattr(s, op)(*args)) for s in (self.rolled, self.raw)]

    def compact(self, *, settle: bool) -> None:
        for store in (self.rolled, self.raw):
            self.runner.run(compact(store, settle=settle))

    def close(self) -> None:
        for store in (self.rolled, self.raw):
            self.runner.run(store.close())
        self.runner.close()


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def pair(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pair]:
    path = tmp_path_factory.mktemp("rollups")
    if request.param == "sqlite":
        small = SqliteSettings(chunk_max_points=16, compact_min_chunks=3)
        p = Pair(
            SqliteTimeSeriesStore(path / "rolled.db", small, LEVELS),
            SqliteTimeSeriesStore(path / "raw.db", small),
        )
    else:
        server: PgServer = request.getfixturevalue("postgres")
        p = Pair(
            PostgresTimeSeriesStore(server.settings(str(path / "rolled")), LEVELS),
            PostgresTimeSeriesStore(server.settings(str(path / "raw"))),
        )
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
            pair.compact(settle=False)
        else:
            start, length = arg
            deleted = pair.both("delete", entity, ["x", "y"], start, start + length)
            assert deleted[0] == deleted[1]
    for settle in (False, True):  # with work pending, then settled (all rolled up)
        if settle:
            pair.compact(settle=True)
        for start, length, agg, interval, order, limit in asked:
            q = Query(entity, ("x", "y"), start, start + length, agg, interval, limit, order)
            rolled, raw = pair.both("query", q)
            assert typed(rolled) == typed(raw), q
