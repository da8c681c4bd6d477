"""The PostgreSQL time-series store's SQL aggregation against the reference one
(`storage/aggregate.py`, what the SQLite store computes with numpy), on generated data:
negative timestamps, odd intervals, mixed kinds, NaN and infinities, long sums past
int64. The contract suite checks the rules on chosen cases; this looks for the cases
nobody chose."""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iotmesh.core.errors import PayloadError
from iotmesh.core.types import Aggregation, Order, TsRecord
from iotmesh.storage import aggregate
from iotmesh.storage.points import Points
from iotmesh.storage.postgres import PostgresTimeSeriesStore
from iotmesh.storage.timeseries import Query, SeriesWrite
from tests.postgres import PgServer

VALUES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.integers(min_value=-1000, max_value=1000),
    st.booleans(),
    st.text(max_size=3),
)
POINTS = st.dictionaries(
    st.integers(min_value=-(10**7), max_value=10**7), VALUES, min_size=1, max_size=40
)


@pytest.fixture
def opened(postgres: PgServer, tmp_path: Path) -> Iterator[tuple[asyncio.Runner, Any]]:
    """A store opened on an event loop of its own, which the examples run on."""
    runner = asyncio.Runner()
    store = PostgresTimeSeriesStore(postgres.settings(str(tmp_path), partition_interval_s=3600))
    runner.run(store.open())
    try:
        yield runner, store
    finally:
        runner.run(store.close())
        runner.close()


def _same(got: Any, want: Any) -> bool:
    if type(got) is not type(want):
        return False
    if isinstance(got, float):
        return (math.isnan(got) and math.isnan(want)) or math.isclose(
            got, want, rel_tol=1e-9, abs_tol=1e-9
        )
    return bool(got == want)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    points=POINTS,
    agg=st.sampled_from([a for a in Aggregation if a is not Aggregation.NONE]),
    interval=st.sampled_from([1, 7, 1000, 60_000, 3_600_001]),
    order=st.sampled_from(list(Order)),
)
def test_sql_aggregation_matches_the_reference(
    opened: tuple[asyncio.Runner, Any],
    points: dict[int, Any],
    agg: Aggregation,
    interval: int,
    order: Order,
) -> None:
    runner, store = opened
    entity = str(uuid.uuid4())
    records = [TsRecord(ts, {"v": v}) for ts, v in points.items()]
    runner.run(store.write([SeriesWrite(entity, records)]))
    start, end = -(10**7), 10**7
    q = Query(entity, ("v",), start, end, agg, interval, 10_000, order)
    reference = Points.from_values(list(points), list(points.values())).window(start, end)
    try:
        # The stores count buckets over the key's points of every kind (as the SQLite
        # store reads its chunks' bounds), before leaving out the non-numeric ones.
        aggregate.check_buckets(int(reference.ts[0]), int(reference.ts[-1]), interval)
        want = aggregate.to_ts_points(aggregate.aggregate(reference, agg, interval), order, 10_000)
    except PayloadError:  # too many buckets: the store must refuse it the same way
        with pytest.raises(PayloadError, match="buckets"):
            runner.run(store.query(q))
        return
    got = runner.run(store.query(q)).get("v", [])
    assert [p.ts for p in got] == [p.ts for p in want]
    for g, w in zip(got, want, strict=True):
        assert _same(g.value, w.value), (g, w)
