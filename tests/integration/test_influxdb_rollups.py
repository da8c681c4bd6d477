"""InfluxDB rollups: answers from rollups equal answers from raw points; they survive
a restart before the step ran, and raw and level TTLs.

Two stores on one real `influxd` (a database each) get the same operations: one keeps
rollups of 5, 20 and 100 ms buckets, the other none, so InfluxDB aggregates its raw
points. Hypothesis draws the operations (batches out of order and late, rewrites of a
ts with another value or kind, deletes of ranges, rollup steps at any point), then
random ranges, intervals and aggregations must answer the same, with markers pending
and after a step. Few examples: every operation is a round trip to influxd.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from iotmesh.core.settings import InfluxSettings
from iotmesh.core.types import Aggregation, Order, TsPoint, TsRecord
from iotmesh.storage.influx import InfluxTimeSeriesStore
from iotmesh.storage.influx.rollup_format import MARKERS, measurement
from iotmesh.storage.rollup import RetentionPolicy
from iotmesh.storage.timeseries import Query, SeriesWrite
from tests.influxd import InfluxServer
from tests.rollup_strategies import LEVELS, operations
from tests.rollup_strategies import queries as rollup_queries

ops = operations("roll", max_writes=40, max_ops=6)
queries = rollup_queries(max_size=8)


class Pair:
    """A store with rollups and one without, on one event loop."""

    def __init__(self, url: str, name: str) -> None:
        self.runner = asyncio.Runner()
        self.rolled = InfluxTimeSeriesStore(
            InfluxSettings(url=url, database=f"{name}_rolled"), levels=LEVELS
        )
        self.raw = InfluxTimeSeriesStore(InfluxSettings(url=url, database=f"{name}_raw"))
        self.entities = itertools.count()
        for store in (self.rolled, self.raw):
            self.runner.run(store.open())

    def both(self, op: str, *args: Any) -> list[Any]:
        return [self.runner.run(getattr(s, op)(*args)) for s in (self.rolled, self.raw)]

    def roll(self) -> None:
        self.runner.run(self.rolled.roll_up())

    def close(self) -> None:
        for store in (self.rolled, self.raw):
            self.runner.run(store.close())
        self.runner.close()


@pytest.fixture(scope="module")
def pair(influxd: InfluxServer) -> Iterator[Pair]:
    p = Pair(influxd.url, "rollup_property")
    try:
        yield p
    finally:
        p.close()


def same(got: list[TsPoint], want: list[TsPoint]) -> bool:
    """Equal typed answers; doubles within 1e-9 (InfluxDB's AVG of mixed kinds rounds)."""
    if [p.ts for p in got] != [p.ts for p in want]:
        return False
    for a, b in zip(got, want, strict=True):
        if type(a.value) is not type(b.value):
            return False
        if isinstance(a.value, float):
            if not math.isclose(a.value, b.value, rel_tol=1e-9, abs_tol=1e-9):
                return False
        elif a.value != b.value:
            return False
    return True


@settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops, queries)
def test_rollup_answers_equal_raw_answers(pair: Pair, operations: Any, asked: Any) -> None:
    entity = f"e{next(pair.entities)}"
    for op, arg in operations:
        if op == "write":
            records = [TsRecord(ts, vals) for ts, vals in arg]
            pair.both("write", [SeriesWrite(entity, records)])
        elif op == "roll":
            pair.roll()
        else:
            start, length = arg
            deleted = pair.both("delete", entity, ["x", "y"], start, start + length)
            assert deleted[0] == deleted[1]
    for settle in (False, True):  # with markers pending, then all rolled up
        if settle:
            pair.roll()
        for start, length, agg, interval, order, limit in asked:
            q = Query(entity, ("x", "y"), start, start + length, agg, interval, limit, order)
            rolled, raw = pair.both("query", q)
            assert rolled.keys() == raw.keys(), q
            for key in raw:
                assert same(rolled[key], raw[key]), (q, key, rolled[key], raw[key])


# -- durability, use, retention ----------------------------------------------------------


def _store(influxd: InfluxServer, tmp_path: Path, levels: tuple[int, ...]) -> InfluxTimeSeriesStore:
    database = f"rollups_{abs(hash(tmp_path))}"
    settings = InfluxSettings(url=influxd.url, database=database)
    # No lag: nothing else writes, and the retention pass must not wait for it.
    return InfluxTimeSeriesStore(settings, levels=levels, rollup_lag_s=0)


async def _count(store: InfluxTimeSeriesStore, what: str, field: str) -> int:
    """Points of a measurement (those with `field`)."""
    (result,) = await store.client.query([f'SELECT COUNT("{field}") FROM {what}'])
    return sum(int(row[1]) for s in result for row in s.values)


async def test_a_marker_survives_a_restart_before_the_step(
    influxd: InfluxServer, tmp_path: Path
) -> None:
    """A late point written just before a crash (no step ran) is in the answers after
    the restart, and in the buckets once the step runs."""
    q = Query("d", ("v",), 0, 9_999, Aggregation.SUM, 1000, 100, Order.ASC)
    store = _store(influxd, tmp_path, (100, 1000))
    await store.open()
    try:
        await store.write([SeriesWrite("d", [TsRecord(t, {"v": 1}) for t in range(0, 10_000, 10)])])
        await store.roll_up()
        assert await _count(store, MARKERS, "lo") == 0
        assert (await store.query(q))["v"][0] == TsPoint(0, 100)
        await store.write([SeriesWrite("d", [TsRecord(5, {"v": 1000})])])  # late
    finally:
        await store.close()  # no step ran: only the marker knows bucket 0 changed
    influxd.stop()
    influxd.launch()
    store = _store(influxd, tmp_path, (100, 1000))
    await store.open()
    try:
        assert await _count(store, MARKERS, "lo") == 1
        assert (await store.query(q))["v"][0] == TsPoint(0, 1100)
        await store.roll_up()
        assert await _count(store, MARKERS, "lo") == 0
        # The buckets themselves are right: raw points gone, the answer stays.
        await store.client.query(["DELETE FROM telemetry WHERE time < 10000000000"])
        assert (await store.query(q))["v"][:2] == [TsPoint(0, 1100), TsPoint(1000, 100)]
    finally:
        await store.close()


async def test_rollups_outlive_raw_points_and_expire_by_level(
    influxd: InfluxServer, tmp_path: Path
) -> None:
    store = _store(influxd, tmp_path, (10, 100))
    await store.open()
    try:
        records = [TsRecord(t, {"v": t % 7, "s": "x"}) for t in range(0, 1000, 3)]
        await store.write([SeriesWrite("d", records)])
        q = Query("d", ("v",), 0, 999, Aggregation.SUM, 100, 100, Order.ASC)
        count = Query("d", ("s",), 0, 999, Aggregation.COUNT, 200, 100, Order.ASC)
        before, counted = await store.query(q), await store.query(count)
        await store.apply_retention(RetentionPolicy(now_ms=1650, raw_ttl_ms=1000))
        # Raw points before 600 (1650 - 1000, aligned down to 100) are gone...
        raw = await store.query(Query("d", ("v",), 0, 999, limit=1000, order=Order.ASC))
        assert min(p.ts for p in raw["v"]) == 600
        # ...but their aggregates are not (the retention pass rolled them up first).
        assert await store.query(q) == before
        assert await store.query(count) == counted
        # A point older than the raw TTL when it arrives is left out of the rollups.
        await store.write([SeriesWrite("d", [TsRecord(10, {"v": 1000})])])
        await store.roll_up()
        assert await store.query(q) == before
        # Deleting an expired range deletes the buckets it covers whole.
        assert await store.delete("d", ["v"], 0, 250) == 1  # the late raw point
        await store.roll_up()
        after = await store.query(q)
        assert after["v"] == before["v"][2:]  # 200..299 was only cut: it keeps its sum
        # Level TTL: the 10 ms level keeps 300 ms; queries before its horizon read the
        # 100 ms level or raw points.
        assert await _count(store, measurement(10), "count") > 0
        await store.apply_retention(RetentionPolicy(now_ms=1300, levels={10: 300}))
        (result,) = await store.client.query([f"SELECT MIN(count) FROM {measurement(10)}"])
        oldest = result[0].values[0][0] if result else None
        assert oldest is None or oldest >= 1000
        assert await store.query(q) == after
        fine = Query("d", ("v",), 600, 999, Aggregation.SUM, 10, 100, Order.ASC)
        want = [
            TsPoint(t, sum(x % 7 for x in range(t, t + 10) if x % 3 == 0))
            for t in range(600, 1000, 10)
        ]
        assert (await store.query(fine))["v"] == want
    finally:
        await store.close()


async def test_levels_added_later_are_built_and_removed_ones_dropped(
    influxd: InfluxServer, tmp_path: Path
) -> None:
    q = Query("d", ("v",), 0, 9_999, Aggregation.SUM, 100, 1000, Order.ASC)

    async def run(levels: tuple[int, ...], write: bool) -> dict[str, Any]:
        store = _store(influxd, tmp_path, levels)
        await store.open()
        try:
            if write:
                records = [TsRecord(t, {"v": t}) for t in range(0, 10_000, 7)]
                await store.write([SeriesWrite("d", records)])
            await store.roll_up()
            answer = await store.query(q)
            (shown,) = await store.client.query(["SHOW MEASUREMENTS"])
            names = {row[0] for s in shown for row in s.values}
            answer["measurements"] = sorted(n for n in names if n.startswith("rollup_"))
            return answer
        finally:
            await store.close()

    raw = await run((), write=True)
    assert raw.pop("measurements") == []
    built = await run((10, 100), write=False)
    assert built.pop("measurements") == ["rollup_10", "rollup_100", "rollup_level"]
    assert built == raw
    fewer = await run((10,), write=False)
    assert fewer.pop("measurements") == ["rollup_10", "rollup_level"]
    assert fewer == raw
