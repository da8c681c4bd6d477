"""Aggregations in InfluxQL, and how their per-kind answers combine into the contract's.

A key's numeric points are longs (`kind = 1`, field `v_l`) and doubles (`kind = 0`,
field `v_d`). InfluxDB aggregates each field on its own, so a query asks twice, per
bucket (`GROUP BY time(<interval>ms) fill(none)`: epoch-aligned buckets labelled with
their start, empty ones left out, as the contract wants), and `combine` joins the two
answers by the rules of `storage/timeseries.py`: a bucket of longs only answers a long,
any double makes the answer a double.

Each aggregate function is a pass over the points in InfluxDB (measured on 1M points:
one MEAN ~0.15 s, SUM+COUNT+MIN+MAX ~0.65 s), so only what the answer needs is asked:

    agg   longs (v_l, kind = 1)           doubles (v_d, kind = 0)
    AVG   SUM, COUNT, MIN, MAX            MEAN (+ COUNT, asked again only for buckets
                                          that hold longs too)
    SUM   SUM, COUNT, MIN, MAX            SUM
    MIN   MIN                             MIN
    MAX   MAX                             MAX

A bucket present in an answer has points (fill(none)), so presence needs no COUNT. MIN
and MAX of the longs bound the bucket's sum: when |value| x count could pass int64, the
sum InfluxDB computed may have wrapped around, and `combine` says so (the caller then
aggregates that key from its raw points).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from iotmesh.core.types import Aggregation
from iotmesh.storage.influx.client import Series
from iotmesh.storage.influx.lineproto import MEASUREMENT
from iotmesh.storage.points import INT64_MAX, Kind

_LONGS = {
    Aggregation.AVG: "SUM(v_l), COUNT(v_l), MIN(v_l), MAX(v_l)",
    Aggregation.SUM: "SUM(v_l), COUNT(v_l), MIN(v_l), MAX(v_l)",
    Aggregation.MIN: "MIN(v_l)",
    Aggregation.MAX: "MAX(v_l)",
}
_DOUBLES = {
    Aggregation.AVG: "MEAN(v_d)",
    Aggregation.SUM: "SUM(v_d)",
    Aggregation.MIN: "MIN(v_d)",
    Aggregation.MAX: "MAX(v_d)",
}


class MayOverflow(Exception):
    """A long bucket's sum could have wrapped around int64 inside InfluxDB."""


@dataclass(frozen=True)
class Longs:
    """The longs of one bucket: sum and count (AVG, SUM), and the min or max."""

    total: int
    count: int
    low: int
    high: int


def group_by(interval_ms: int, order: str, limit: int | None) -> str:
    tail = f" LIMIT {limit}" if limit is not None else ""
    return f" GROUP BY time({interval_ms}ms) fill(none) ORDER BY time {order}{tail}"


def statements(agg: Aggregation, where: str, group: str) -> list[str]:
    """The longs statement and the doubles statement of a numeric aggregation."""
    return [
        f"SELECT {_LONGS[agg]} FROM {MEASUREMENT} WHERE {where} AND kind = {Kind.LONG.value}"
        + group,
        f"SELECT {_DOUBLES[agg]} FROM {MEASUREMENT} WHERE {where} AND kind = {Kind.DOUBLE.value}"
        + group,
    ]


def count_doubles(where: str, group: str) -> str:
    """The statement counting each bucket's doubles (AVG of buckets holding both kinds)."""
    return (
        f"SELECT COUNT(v_d) FROM {MEASUREMENT} WHERE {where} AND kind = {Kind.DOUBLE.value}" + group
    )


def longs(agg: Aggregation, result: list[Series]) -> dict[int, Longs]:
    """The longs answer, by bucket start."""
    out: dict[int, Longs] = {}
    for series in result:
        for row in series.values:
            if agg is Aggregation.MIN or agg is Aggregation.MAX:
                value = int(row[1])
                out[int(row[0])] = Longs(0, 0, value, value)
            else:
                out[int(row[0])] = Longs(int(row[1]), int(row[2]), int(row[3]), int(row[4]))
    return out


def doubles(result: list[Series]) -> dict[int, float]:
    """The doubles answer (one value per bucket), by bucket start."""
    return {int(row[0]): float(row[1]) for series in result for row in series.values}


def mixed(agg: Aggregation, by_long: dict[int, Longs], by_double: dict[int, float]) -> set[int]:
    """Buckets whose AVG needs the count of their doubles (they hold longs too)."""
    if agg is not Aggregation.AVG:
        return set()
    return by_long.keys() & by_double.keys()


def combine(
    agg: Aggregation,
    by_long: dict[int, Longs],
    by_double: dict[int, float],
    double_counts: dict[int, float],
) -> list[tuple[int, Any]]:
    """Each bucket's answer, as (bucket start, value), unsorted.

    Raises:
        MayOverflow: a long sum InfluxDB computed may have wrapped around.
    """
    out: list[tuple[int, Any]] = []
    for t in by_long.keys() | by_double.keys():
        lg, db = by_long.get(t), by_double.get(t)
        sums = agg is Aggregation.AVG or agg is Aggregation.SUM
        if sums and lg is not None and max(abs(lg.low), abs(lg.high)) * lg.count > INT64_MAX:
            raise MayOverflow(t)
        value: Any
        if db is None:
            assert lg is not None
            if agg is Aggregation.AVG:
                value = lg.total / lg.count
            elif agg is Aggregation.SUM:
                value = lg.total
            else:
                value = lg.low if agg is Aggregation.MIN else lg.high
        elif lg is None:
            value = db
        elif agg is Aggregation.AVG:
            n = int(double_counts[t])
            value = (lg.total + db * n) / (lg.count + n)
        elif agg is Aggregation.SUM:
            value = float(lg.total + db)
        elif agg is Aggregation.MIN:
            value = float(min(lg.low, db))
        else:
            value = float(max(lg.high, db))
        out.append((t, value))
    return out


__all__ = [
    "Longs",
    "MayOverflow",
    "combine",
    "count_doubles",
    "doubles",
    "group_by",
    "longs",
    "mixed",
    "statements",
]
