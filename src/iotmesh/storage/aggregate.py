"""The query answer every backend shares: range, order, limit and aggregation.

A backend reads a series however it stores it, as `points.Points` (numpy columns,
timestamps ascending and unique). Everything after that, the validation of the query,
the aggregation rules of `storage/timeseries.py` and `order`/`limit`, is done here with
whole-array numpy operations, so a million points cost milliseconds and every backend
answers the same way.

Aggregation: buckets are `[k * interval_ms, (k + 1) * interval_ms)` for integer k (so they
line up across queries); `np.searchsorted` finds each bucket's first point and
`np.add.reduceat` / `np.minimum.reduceat` / `np.maximum.reduceat` reduce every bucket in
one call. A bucket's result is a long when every numeric point in it is a long (computed
on the int64 column, so it is exact), otherwise a double.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from iotmesh.core.errors import PayloadError
from iotmesh.core.types import Aggregation, Order, TsPoint
from iotmesh.storage.points import INT64_MAX, INT64_MIN, F64Array, I64Array, Kind, Points

# Most buckets an aggregation may span per key. Over a year of data, 100k buckets is a
# bucket every ~5 minutes; a finer interval over such a range is a mistake or an attack
# (each bucket costs memory), so it is refused. The span counted is that of the key's
# data within the query range, so the API's open default range (start_ts=0) is fine.
MAX_BUCKETS = 100_000


@dataclass(frozen=True, slots=True)
class Buckets:
    """Aggregated buckets, ascending: bucket start times and their values."""

    ts: I64Array
    values: list[Any]


def validate(start_ts: int, end_ts: int, agg: Aggregation, interval_ms: int, limit: int) -> None:
    """Refuse a malformed query (before any data is read).

    Raises:
        PayloadError: with a message the API can show to the user.
    """
    if start_ts > end_ts:
        raise PayloadError(f"start_ts ({start_ts}) must not be after end_ts ({end_ts})")
    if limit < 1:
        raise PayloadError(f"limit must be at least 1, not {limit}")
    if agg is not Aggregation.NONE and interval_ms <= 0:
        raise PayloadError(
            f"interval_ms must be a positive number of milliseconds with agg={agg.value}"
        )


def check_buckets(first_ts: int, last_ts: int, interval_ms: int) -> None:
    """Refuse an aggregation whose points span more than `MAX_BUCKETS` buckets.

    Called with the range the series' data actually covers within the query, so an
    open range (start_ts=0, the API's default) is fine while the data is not spread
    over more buckets than that.

    Raises:
        PayloadError: with a message the API can show to the user.
    """
    buckets = last_ts // interval_ms - first_ts // interval_ms + 1
    if buckets > MAX_BUCKETS:
        raise PayloadError(
            f"the query would aggregate over up to {buckets} buckets per key, over the limit"
            f" of {MAX_BUCKETS}: use a larger interval_ms or a shorter time range"
        )


def aggregate(points: Points, agg: Aggregation, interval_ms: int) -> Buckets:
    """Aggregate `points` (already windowed to the query range) into buckets.

    Buckets without points (without numeric points, for AVG/MIN/MAX/SUM) are omitted.
    """
    if agg is Aggregation.NONE:
        raise ValueError("aggregate() needs an aggregation, not NONE")
    if interval_ms <= 0:
        raise PayloadError("interval_ms must be positive")
    if agg is not Aggregation.COUNT:
        points = _numeric(points)
    n = len(points)
    if n == 0:
        return Buckets(np.empty(0, np.int64), [])
    ts = points.ts
    check_buckets(int(ts[0]), int(ts[-1]), interval_ms)  # bounds the `edges` array
    first = int(ts[0]) - int(ts[0]) % interval_ms
    last = int(ts[-1]) - int(ts[-1]) % interval_ms
    edges = np.arange(first, last + interval_ms, interval_ms, dtype=np.int64)
    bounds = np.searchsorted(ts, edges, side="left")
    counts = np.diff(bounds, append=n)
    nonempty = np.flatnonzero(counts)
    starts = bounds[nonempty]
    count = counts[nonempty]
    bucket_ts = edges[nonempty]
    if agg is Aggregation.COUNT:
        return Buckets(bucket_ts, count.tolist())
    return Buckets(bucket_ts, _reduce(points, agg, starts, count))


def _numeric(points: Points) -> Points:
    """The LONG and DOUBLE points only."""
    if len(points) == 0 or int(points.kinds.max()) <= Kind.LONG:
        return points
    return points.take(np.flatnonzero(points.kinds <= Kind.LONG))


def _reduce(
    points: Points, agg: Aggregation, starts: npt.NDArray[np.intp], count: I64Array
) -> list[Any]:
    """Reduce each bucket of numeric points; longs where a bucket is all longs."""
    is_long = points.kinds == Kind.LONG
    n_long = int(np.count_nonzero(is_long))
    doubles = points.doubles
    if agg is Aggregation.AVG:
        if n_long == len(points):
            assert points.longs is not None
            sums = _int_sums(points.longs, starts, count)
            return [s / c for s, c in zip(sums, count.tolist(), strict=True)]
        return (np.add.reduceat(doubles, starts) / count).tolist()  # type: ignore[no-any-return]
    if n_long == 0:
        return _float_reduce(doubles, agg, starts).tolist()  # type: ignore[no-any-return]
    assert points.longs is not None
    longs = points.longs
    if n_long == len(points):
        return _int_reduce(longs, agg, starts, count)
    # Mixed: a bucket of only longs still answers a long, computed on the int column
    # with the doubles replaced by the operation's identity.
    identity = {Aggregation.SUM: 0, Aggregation.MIN: INT64_MAX, Aggregation.MAX: INT64_MIN}
    int_part = np.where(is_long, longs, identity[agg])
    all_long = (np.add.reduceat(is_long.astype(np.int64), starts) == count).tolist()
    ints = _int_reduce(int_part, agg, starts, count)
    floats = _float_reduce(doubles, agg, starts).tolist()
    return [i if a else f for i, f, a in zip(ints, floats, all_long, strict=True)]


def _float_reduce(values: F64Array, agg: Aggregation, starts: npt.NDArray[np.intp]) -> F64Array:
    if agg is Aggregation.SUM:
        return np.add.reduceat(values, starts)
    if agg is Aggregation.MIN:
        return np.minimum.reduceat(values, starts)
    return np.maximum.reduceat(values, starts)


def _int_reduce(
    values: I64Array, agg: Aggregation, starts: npt.NDArray[np.intp], count: I64Array
) -> list[int]:
    if agg is Aggregation.SUM:
        return _int_sums(values, starts, count)
    if agg is Aggregation.MIN:
        return np.minimum.reduceat(values, starts).tolist()  # type: ignore[no-any-return]
    return np.maximum.reduceat(values, starts).tolist()  # type: ignore[no-any-return]


def _int_sums(values: I64Array, starts: npt.NDArray[np.intp], count: I64Array) -> list[int]:
    """Exact bucket sums: int64 when they cannot overflow, Python ints when they could."""
    magnitude = max(int(values.max()), -int(values.min()))
    if magnitude * int(count.max()) <= INT64_MAX:
        return np.add.reduceat(values, starts).tolist()  # type: ignore[no-any-return]
    ends = [*starts.tolist()[1:], len(values)]
    return [sum(values[a:b].tolist()) for a, b in zip(starts.tolist(), ends, strict=True)]


def select(result: Points | Buckets, order: Order, limit: int) -> tuple[I64Array, list[Any]]:
    """The first `limit` points or buckets of `result` in `order`: (ts, values)."""
    n = len(result.ts)
    if order is Order.ASC:
        lo, hi = 0, min(n, limit)
    else:
        lo, hi = max(0, n - limit), n
    ts = result.ts[lo:hi]
    values = result.values(lo, hi) if isinstance(result, Points) else result.values[lo:hi]
    if order is Order.DESC:
        return ts[::-1], values[::-1]
    return ts, values


def to_ts_points(result: Points | Buckets, order: Order, limit: int) -> list[TsPoint]:
    """The answer of one key: at most `limit` TsPoints in `order`."""
    ts, values = select(result, order, limit)
    return [TsPoint(t, v) for t, v in zip(ts.tolist(), values, strict=True)]


def boundary(result: Points | Buckets, order: Order, limit: int, interval_ms: int) -> int | None:
    """The ts beyond which unread points cannot change the first `limit` answers.

    DESC: points with ts < boundary cannot matter; ASC: points with ts > boundary cannot.
    None while fewer than `limit` answers are known (everything may still matter).
    """
    n = len(result.ts)
    if n < limit:
        return None
    if order is Order.DESC:
        return int(result.ts[n - limit])
    last = int(result.ts[limit - 1])
    return last + interval_ms - 1 if isinstance(result, Buckets) else last
