"""Property tests: numpy aggregation equals a plain-Python reference, for every Aggregation.

Writes are generated out of order, with repeated timestamps (the last write wins), with
every value kind, across bucket boundaries (negative timestamps included, where floor
division and truncation differ). The reference below is written for clarity, point by
point, straight from the rules in the docstring of `iotmesh.storage.timeseries`.
"""

from __future__ import annotations

import math
from itertools import pairwise
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iotmesh.core.errors import PayloadError
from iotmesh.core.types import Aggregation, Order
from iotmesh.storage.aggregate import (
    MAX_BUCKETS,
    aggregate,
    boundary,
    check_buckets,
    select,
    to_ts_points,
    validate,
)
from iotmesh.storage.points import INT64_MAX, INT64_MIN, Kind, Points, classify, merge

AGGREGATIONS = [a for a in Aggregation if a is not Aggregation.NONE]

numbers = st.one_of(
    st.floats(min_value=-1e6, max_value=1e6, allow_nan=False),
    st.integers(min_value=-(10**6), max_value=10**6),
    st.integers(min_value=INT64_MIN, max_value=INT64_MAX),  # exact long sums and min/max
    st.sampled_from([2**63, -(2**63) - 1, 2**70]),  # outside int64: stored as doubles
)
others = st.one_of(
    st.booleans(),
    st.text(max_size=5),
    st.dictionaries(st.text(max_size=3), st.integers() | st.none(), max_size=2),
    st.lists(st.integers(-5, 5), max_size=3),
    st.none(),
)
values = st.one_of(numbers, numbers, others)  # numbers twice as likely
# Mostly a narrow range, so that buckets hold several points and timestamps repeat.
timestamps = st.one_of(st.integers(-25, 25), st.integers(-300, 3000))
writes = st.lists(st.tuples(timestamps, values), max_size=80)


def stored(value: Any) -> Any:
    """The value as the store keeps it: an int outside int64 becomes a float."""
    if type(value) is int and not INT64_MIN <= value <= INT64_MAX:
        return float(value)
    return value


def is_numeric(value: Any) -> bool:
    return type(value) in (int, float)


def reference(
    writes: list[tuple[int, Any]], agg: Aggregation, interval: int, start: int, end: int
) -> list[tuple[int, Any, float]]:
    """The buckets, ascending, computed point by point: (start, value, rounding bound).

    The bound is how far a float sum of the bucket may be from the exact one:
    n * eps * sum(|v|) (with margin); MIN, MAX, COUNT and long results must be exact.
    """
    latest: dict[int, Any] = {}
    for ts, value in writes:
        latest[ts] = stored(value)
    buckets: dict[int, list[Any]] = {}
    for ts in sorted(latest):
        value = latest[ts]
        if not start <= ts <= end:
            continue
        if agg is Aggregation.COUNT or is_numeric(value):
            buckets.setdefault(ts - ts % interval, []).append(value)
    out = []
    for bucket, vs in sorted(buckets.items()):
        all_long = all(type(v) is int for v in vs)
        bound = 0.0
        if agg in (Aggregation.SUM, Aggregation.AVG) and not all_long:
            bound = 1e-15 * len(vs) * math.fsum(abs(float(v)) for v in vs)
            bound /= len(vs) if agg is Aggregation.AVG else 1
        result: Any
        if agg is Aggregation.COUNT:
            result = len(vs)
        elif agg is Aggregation.AVG:
            result = sum(vs) / len(vs) if all_long else math.fsum(vs) / len(vs)
        elif agg is Aggregation.SUM:
            result = sum(vs) if all_long else math.fsum(vs)
        elif agg is Aggregation.MIN:
            result = min(vs) if all_long else float(min(vs))
        else:
            result = max(vs) if all_long else float(max(vs))
        out.append((bucket, result, bound))
    return out


def check(got: list[tuple[int, Any]], want: list[tuple[int, Any, float]]) -> None:
    assert [ts for ts, _ in got] == [ts for ts, _, _ in want]
    for (ts, a), (_, b, bound) in zip(got, want, strict=True):
        assert type(a) is type(b), (ts, a, b)
        if bound:
            assert math.isclose(a, b, rel_tol=1e-12, abs_tol=bound), (ts, a, b)
        elif type(a) is float and type(b) is float and bound == 0 and a != b:
            # AVG of longs: both sides divide an exact int sum; allow the last bit.
            assert math.isclose(a, b, rel_tol=1e-15), (ts, a, b)
        else:
            assert a == b, (ts, a, b)


@settings(max_examples=300, deadline=None)
@given(
    writes=writes,
    agg=st.sampled_from(AGGREGATIONS),
    interval=st.sampled_from([1, 7, 10, 60, 1000, 5000]),
    start=st.one_of(st.just(-400), st.integers(-400, 3000)),
    span=st.one_of(st.just(4000), st.integers(0, 4000)),
)
def test_aggregate_matches_reference(
    writes: list[tuple[int, Any]], agg: Aggregation, interval: int, start: int, span: int
) -> None:
    ts = [t for t, _ in writes]
    points = Points.from_values(ts, [v for _, v in writes]).window(start, start + span)
    buckets = aggregate(points, agg, interval)
    got = list(zip(buckets.ts.tolist(), buckets.values, strict=True))
    check(got, reference(writes, agg, interval, start, start + span))


@settings(max_examples=200, deadline=None)
@given(writes=writes, cuts=st.lists(st.integers(0, 80), max_size=4))
def test_merge_of_parts_in_write_order_is_last_write_wins(
    writes: list[tuple[int, Any]], cuts: list[int]
) -> None:
    # Parts as a backend reads them: each sorted and unique, given in write order.
    bounds = [0, *sorted(c for c in cuts if c <= len(writes)), len(writes)]
    parts = [
        Points.from_values([t for t, _ in part], [v for _, v in part])
        for part in (writes[a:b] for a, b in pairwise(bounds))
    ]
    merged = merge(parts)
    whole = Points.from_values([t for t, _ in writes], [v for _, v in writes])
    assert merged.ts.tolist() == whole.ts.tolist()
    assert merged.kinds.tolist() == whole.kinds.tolist()
    assert merged.values() == whole.values()


@settings(max_examples=200, deadline=None)
@given(writes=writes, order=st.sampled_from(list(Order)), limit=st.integers(1, 100))
def test_points_order_and_limit(writes: list[tuple[int, Any]], order: Order, limit: int) -> None:
    latest = {ts: stored(v) for ts, v in writes}
    want = sorted(latest.items(), reverse=order is Order.DESC)[:limit]
    points = Points.from_values([t for t, _ in writes], [v for _, v in writes])
    got = [(p.ts, p.value) for p in to_ts_points(points, order, limit)]
    assert [ts for ts, _ in got] == [ts for ts, _ in want]
    for (_, a), (_, b) in zip(got, want, strict=True):
        assert type(a) is type(b)
        assert a == b


@settings(max_examples=200, deadline=None)
@given(
    writes=writes,
    agg=st.sampled_from([Aggregation.NONE, *AGGREGATIONS]),
    order=st.sampled_from(list(Order)),
    limit=st.integers(1, 20),
    cut=st.integers(-300, 3000),
)
def test_boundary_says_when_older_points_cannot_matter(
    writes: list[tuple[int, Any]], agg: Aggregation, order: Order, limit: int, cut: int
) -> None:
    """Adding points beyond the boundary leaves the first `limit` answers unchanged."""
    interval = 60

    def answer(ws: list[tuple[int, Any]]) -> tuple[list[int], list[Any]]:
        points = Points.from_values([t for t, _ in ws], [v for _, v in ws])
        result = points if agg is Aggregation.NONE else aggregate(points, agg, interval)
        ts, vals = select(result, order, limit)
        return ts.tolist(), vals

    if order is Order.DESC:
        newer, older = [w for w in writes if w[0] >= cut], [w for w in writes if w[0] < cut]
    else:
        newer, older = [w for w in writes if w[0] <= cut], [w for w in writes if w[0] > cut]
    points = Points.from_values([t for t, _ in newer], [v for _, v in newer])
    result = points if agg is Aggregation.NONE else aggregate(points, agg, interval)
    bound = boundary(result, order, limit, interval)
    if bound is None:
        return
    beyond = (
        all(t < bound for t, _ in older)
        if order is Order.DESC
        else all(t > bound for t, _ in older)
    )
    if beyond:
        assert answer(older + newer) == answer(newer)


def test_long_sum_beyond_int64_is_exact() -> None:
    big = INT64_MAX - 1
    points = Points.from_values([1, 2, 3], [big, big, 5])
    buckets = aggregate(points, Aggregation.SUM, 10)
    assert buckets.values == [2 * big + 5]
    assert type(buckets.values[0]) is int


def test_bool_is_not_numeric_and_not_a_long() -> None:
    assert classify(True) == (Kind.BOOL, True)
    assert classify(1) == (Kind.LONG, 1)
    points = Points.from_values([1, 2], [True, 3])
    assert aggregate(points, Aggregation.SUM, 10).values == [3]
    assert aggregate(points, Aggregation.COUNT, 10).values == [2]
    assert points.values() == [True, 3]


def test_empty_points() -> None:
    empty = Points.empty()
    for agg in AGGREGATIONS:
        buckets = aggregate(empty, agg, 10)
        assert buckets.values == []
        assert len(buckets.ts) == 0
    assert to_ts_points(empty, Order.DESC, 10) == []
    assert merge([]).ts.dtype == np.int64


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((10, 5, Aggregation.NONE, 0, 10), "start_ts"),
        ((0, 5, Aggregation.NONE, 0, 0), "limit"),
        ((0, 5, Aggregation.AVG, 0, 10), "interval_ms"),
        ((0, 5, Aggregation.MAX, -1, 10), "interval_ms"),
    ],
)
def test_validate_refuses(args: tuple[int, int, Aggregation, int, int], message: str) -> None:
    with pytest.raises(PayloadError, match=message):
        validate(*args)


def test_bucket_limit() -> None:
    validate(0, 10**13, Aggregation.AVG, 1, 10)  # the range alone is not refused
    check_buckets(0, MAX_BUCKETS - 1, 1)
    check_buckets(-10, MAX_BUCKETS * 10 - 11, 10)  # -1 .. 99998: exactly the limit
    with pytest.raises(PayloadError, match="buckets"):
        check_buckets(0, MAX_BUCKETS, 1)
    points = Points.from_values([0, MAX_BUCKETS * 7], [1.0, 2.0])
    with pytest.raises(PayloadError, match="buckets"):
        aggregate(points, Aggregation.AVG, 7)
    assert aggregate(points, Aggregation.AVG, 8).values == [1.0, 2.0]
