"""InfluxDB store paths the contract suite does not reach, checked against SQLite.

The same points go to both stores and every aggregation must answer the same: the
non-finite doubles (aggregated in iotmesh, not InfluxDB), the bucket limit where
non-numeric points span more than the numeric ones, and AVG over buckets mixing longs
and doubles (whose double count is asked for separately).
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from iotmesh.core.errors import PayloadError
from iotmesh.core.settings import InfluxSettings, SqliteSettings
from iotmesh.core.types import Aggregation, Order, TsPoint, TsRecord
from iotmesh.storage.influx import InfluxTimeSeriesStore
from iotmesh.storage.sqlite.tsdb import SqliteTimeSeriesStore
from iotmesh.storage.timeseries import Query, SeriesWrite, TimeSeriesStore
from tests.influxd import InfluxServer

AGGS = [a for a in Aggregation if a is not Aggregation.NONE]


@pytest.fixture
async def stores(
    influxd: InfluxServer, tmp_path: Path
) -> AsyncIterator[tuple[TimeSeriesStore, TimeSeriesStore]]:
    influx = InfluxTimeSeriesStore(
        InfluxSettings(url=influxd.url, database=f"diff_{abs(hash(tmp_path))}")
    )
    sqlite = SqliteTimeSeriesStore(tmp_path / "ts.db", SqliteSettings())
    await influx.open()
    await sqlite.open()
    try:
        yield influx, sqlite
    finally:
        await influx.close()
        await sqlite.close()


def _same(a: list[TsPoint], b: list[TsPoint]) -> bool:
    if [p.ts for p in a] != [p.ts for p in b]:
        return False
    for x, y in zip(a, b, strict=True):
        if type(x.value) is not type(y.value):
            return False
        if isinstance(x.value, float):
            if math.isnan(x.value) != math.isnan(y.value):
                return False
            if not math.isnan(x.value) and not math.isclose(x.value, y.value, rel_tol=1e-12):
                return False
        elif x.value != y.value:
            return False
    return True


async def _both(stores: tuple[TimeSeriesStore, TimeSeriesStore], records: list[TsRecord]) -> None:
    for store in stores:
        await store.write([SeriesWrite("dev", records)])


async def _compare(stores: tuple[TimeSeriesStore, TimeSeriesStore], q: Query) -> Any:
    influx, sqlite = stores
    got, want = await influx.query(q), await sqlite.query(q)
    assert got.keys() == want.keys(), q
    for key in want:
        assert _same(got[key], want[key]), (q, got[key], want[key])
    return got


async def test_non_finite_doubles(stores: tuple[TimeSeriesStore, TimeSeriesStore]) -> None:
    # (-inf and inf in one bucket would make numpy warn, an error under pytest.)
    values = [1.0, math.inf, 2, math.nan, 3.5, "x", 4, -math.inf]
    await _both(stores, [TsRecord(i * 10, {"v": v}) for i, v in enumerate(values)])
    raw = await stores[0].query(Query("dev", ("v",), 0, 100, order=Order.ASC))
    assert [type(p.value) for p in raw["v"]] == [float, float, int, float, float, str, int, float]
    assert raw["v"][1].value == math.inf
    assert math.isnan(raw["v"][3].value)
    assert raw["v"][7].value == -math.inf
    for agg in AGGS:
        for interval in (20, 60):
            await _compare(stores, Query("dev", ("v",), 0, 100, agg, interval, 100, Order.ASC))


async def test_bucket_limit_counts_points_of_every_kind(
    stores: tuple[TimeSeriesStore, TimeSeriesStore],
) -> None:
    # Strings 10**9 ms apart around numbers within 2 s: SQLite counts the span of all
    # points in the range, so per-ms buckets are refused, and InfluxDB must agree.
    await _both(
        stores,
        [TsRecord(0, {"v": "start"}), TsRecord(10**9, {"v": "end"})]
        + [TsRecord(5000 + i, {"v": float(i)}) for i in range(0, 2000, 7)],
    )
    for agg in AGGS:
        for store in stores:
            with pytest.raises(PayloadError, match="buckets"):
                await store.query(Query("dev", ("v",), 0, 10**9, agg, 1))
        # Around the numbers only, it is fine.
        got = await _compare(stores, Query("dev", ("v",), 4000, 8000, agg, 1, 1000, Order.DESC))
        assert len(got["v"]) == len(range(0, 2000, 7))


async def test_avg_over_buckets_of_longs_and_doubles(
    stores: tuple[TimeSeriesStore, TimeSeriesStore],
) -> None:
    records = [TsRecord(i, {"v": i if i % 3 else i / 2, "w": i}) for i in range(0, 1000, 5)]
    await _both(stores, records)
    for start, end in ((0, 1000), (123, 877)):
        for interval in (10, 60, 1000):
            for order in Order:
                for limit in (1, 7, 1000):
                    q = Query(
                        "dev", ("v", "w"), start, end, Aggregation.AVG, interval, limit, order
                    )
                    await _compare(stores, q)
