"""Property tests of the rollup math: rollup buckets, combined, answer what raw points do.

Points of every kind (and longs of any int64 magnitude, so long sums wrap modulo 2**64
inside the rollups) are rolled up into level buckets, some of those are recomputed
from raw points as a query's edges would be, and the combination must equal
`aggregate.aggregate` on the raw points: exactly for counts, min, max and long
results; double sums and averages within rounding (relative 1e-9 of the sum of
magnitudes), exactly where the doubles add without rounding (quarters).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from iotmesh.core.types import Aggregation
from iotmesh.storage import rollup
from iotmesh.storage.aggregate import aggregate
from iotmesh.storage.points import INT64_MAX, INT64_MIN, Points
from iotmesh.storage.rollup import RetentionPolicy

AGGREGATIONS = [a for a in Aggregation if a is not Aggregation.NONE]

exact_values = st.one_of(
    st.integers(-4000, 4000).map(lambda k: k / 4),  # doubles that add without rounding
    st.integers(-(10**6), 10**6),
    st.integers(-(2**40), 2**40),  # mixed with quarters, still exact as doubles
    st.booleans(),
    st.text(max_size=3),
    st.none(),
)
# Longs of any magnitude: their sums wrap modulo 2**64 inside the rollups.
long_values = st.one_of(st.integers(INT64_MIN, INT64_MAX), st.text(max_size=2))
any_values = st.one_of(
    st.integers(INT64_MIN, INT64_MAX),
    st.floats(allow_nan=False, allow_infinity=False, min_value=-1e12, max_value=1e12),
    exact_values,
)


def typed(buckets: Any) -> list[tuple[int, type, Any]]:
    return [(t, type(v), v) for t, v in zip(buckets.ts.tolist(), buckets.values, strict=True)]


def close(a: list[tuple[int, type, Any]], b: list[tuple[int, type, Any]], scale: float) -> bool:
    if len(a) != len(b):
        return False
    for (ta, ka, va), (tb, kb, vb) in zip(a, b, strict=True):
        if ta != tb or ka is not kb:
            return False
        if ka is float:
            if not math.isclose(va, vb, rel_tol=1e-9, abs_tol=1e-9 * scale):
                return False
        elif va != vb:
            return False
    return True


@st.composite
def cases(draw: st.DrawFn, values: st.SearchStrategy[Any]) -> tuple[Points, int, int, int, int]:
    size = draw(st.sampled_from([1, 2, 5, 10]))
    factor = draw(st.sampled_from([1, 2, 3, 7]))
    n = draw(st.integers(0, 60))
    ts = draw(st.lists(st.integers(-200, 200), min_size=n, max_size=n))
    vals = draw(st.lists(values, min_size=n, max_size=n))
    points = Points.from_values(ts, vals)
    cut_lo = draw(st.integers(-220, 220))
    cut_hi = draw(st.integers(cut_lo, 240))
    return points, size, size * factor, cut_lo, cut_hi


def from_rollups(points: Points, size: int, interval: int, lo: int, hi: int) -> rollup.RollupArray:
    """Level buckets in [lo, hi) from stored rollups, the rest from raw partials."""
    stored = rollup.compute(points, size)
    r0, r1 = rollup.ceil(lo, size), rollup.floor(hi, size)
    used = stored[(stored["ts"] >= r0) & (stored["ts"] < r1)]
    ts = points.ts
    raw = points.take(np.flatnonzero((ts < r0) | (ts >= r1)))
    return rollup.combine(rollup.concat_sorted([used, rollup.compute(raw, size)]), interval)


@settings(max_examples=300, deadline=None)
@given(st.one_of(cases(exact_values), cases(long_values)), st.sampled_from(AGGREGATIONS))
def test_rollups_answer_exactly_what_raw_points_do(
    case: tuple[Points, int, int, int, int], agg: Aggregation
) -> None:
    points, size, interval, lo, hi = case
    want = aggregate(points, agg, interval)
    got = rollup.answer(from_rollups(points, size, interval, lo, hi), agg)
    assert typed(got) == typed(want)


@settings(max_examples=300, deadline=None)
@given(cases(any_values), st.sampled_from(AGGREGATIONS))
def test_double_sums_differ_by_rounding_only(
    case: tuple[Points, int, int, int, int], agg: Aggregation
) -> None:
    points, size, interval, lo, hi = case
    want = aggregate(points, agg, interval)
    got = rollup.answer(from_rollups(points, size, interval, lo, hi), agg)
    scale = float(np.abs(points.doubles).sum()) + 1.0
    assert close(typed(got), typed(want), scale)


def test_long_sums_beyond_int64_are_exact() -> None:
    ts = list(range(0, 40, 2))
    values = [INT64_MAX - i for i in range(20)]
    points = Points.from_values(ts, values)
    got = rollup.answer(rollup.combine(rollup.compute(points, 2), 40), Aggregation.SUM)
    assert got.values == [sum(values)]
    got = rollup.answer(rollup.combine(rollup.compute(points, 2), 40), Aggregation.AVG)
    assert got.values == [sum(values) / 20]


def test_a_bucket_equal_to_a_level_bucket_has_the_raw_bits() -> None:
    ts = list(range(100))
    values = [0.1 * i for i in range(100)]
    points = Points.from_values(ts, values)
    for agg in (Aggregation.SUM, Aggregation.AVG):
        want = aggregate(points, agg, 10)
        got = rollup.answer(rollup.combine(rollup.compute(points, 10), 10), agg)
        assert got.values == want.values


def test_raw_ttl_rules() -> None:
    policy = RetentionPolicy(
        now_ms=10_000, raw_ttl_ms=1000, keys={"keep": 0, "short": 100}, entities={"dev": 5000}
    )
    assert policy.raw_ttl("x", "t") == 1000
    assert policy.raw_ttl("x", "keep") == 0  # forever
    assert policy.raw_ttl("x", "short") == 100  # a key rule may shorten the default
    assert policy.raw_ttl("dev", "short") == 5000  # the longest of the matching rules
    assert policy.raw_cutoff("x", "t", 1) == 9000
    assert policy.raw_cutoff("x", "t", 4000) == 8000  # aligned down to the coarsest level
    assert policy.raw_cutoff("x", "keep", 1) is None
    assert RetentionPolicy(now_ms=1).raw_cutoff("x", "t", 1) is None
