"""Hypothesis strategies of the rollup property tests: every backend draws the same data.

The operations are batches of points out of order and late, rewrites of a ts with
another kind, deletes of ranges, and a backend's own settling step (SQLite and
PostgreSQL compact; InfluxDB runs its rollup step); the queries are aggregations over
ranges that start, end and cut level buckets anywhere, with intervals a level divides
(answered from rollups) and ones none does (7: answered from raw points).
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from iotmesh.core.types import Aggregation, Order

LEVELS = (5, 20, 100)
AGGREGATIONS = [a for a in Aggregation if a is not Aggregation.NONE]
values = st.one_of(
    st.integers(-400, 400).map(lambda k: k / 4),
    st.integers(-(2**40), 2**40),  # with quarters: sums stay exact as doubles
    st.integers(-50, 50),
    st.booleans(),
    st.sampled_from(["a", "b"]),
)


def operations(settle: str, max_writes: int, max_ops: int) -> st.SearchStrategy[Any]:
    """Lists of ("write", [(ts, {key: value})]), (`settle`, None), ("delete", (start, length))."""
    writes = st.lists(
        st.tuples(st.integers(0, 700), st.dictionaries(st.sampled_from("xy"), values, min_size=1)),
        min_size=1,
        max_size=max_writes,
    )
    return st.lists(
        st.one_of(
            st.tuples(st.just("write"), writes),
            st.tuples(st.just(settle), st.none()),
            st.tuples(st.just("delete"), st.tuples(st.integers(0, 700), st.integers(0, 120))),
        ),
        min_size=1,
        max_size=max_ops,
    )


def queries(max_size: int) -> st.SearchStrategy[Any]:
    """Lists of (start, length, aggregation, interval_ms, order, limit)."""
    return st.lists(
        st.tuples(
            st.integers(-10, 400),
            st.integers(0, 720),  # the range's length
            st.sampled_from(AGGREGATIONS),
            st.sampled_from([5, 10, 20, 40, 60, 100, 200, 300, 7]),
            st.sampled_from(list(Order)),
            st.integers(1, 200),
        ),
        min_size=3,
        max_size=max_size,
    )
