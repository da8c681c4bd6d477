"""Rollups: per-bucket partial aggregates that answer `agg` queries without raw points.

Backend-neutral: a backend stores rollup buckets however it likes (SQLite: blobs of
`ROLLUP` records per block of buckets) and uses this module to compute them from raw
`Points`, to combine them into a query's buckets, and to turn those into the same
answer `aggregate.aggregate` gives from raw points.

A rollup bucket of width `size` holds, for the points with ts in [ts, ts + size):

    count            every point (COUNT)
    num              numeric points (LONG and DOUBLE)
    longs            LONG points
    sum_d min_d max_d  over the numeric points, as doubles (a LONG as its float)
    sum_l min_l max_l  over the LONG points; sum_l wraps around modulo 2**64

That is exactly what the aggregation rules of `storage/timeseries.py` need: a query
bucket answers a long for MIN/MAX/SUM when every numeric point in it is a long
(`longs == num`), AVG is exact (Python ints) when every numeric point of the answer is
a long. Buckets combine by adding counts and sums and taking min of mins, max of maxes,
so a query bucket of width k * size is the combination of k rollup buckets, and the
edges of a range that cut a rollup bucket are computed from raw points into partial
buckets of the same form.

Exactness (what the property tests check):

* COUNT, MIN, MAX and every long result (SUM, and AVG of longs) are exactly what raw
  points give. A long sum is kept modulo 2**64 (`sum_l`, numpy's wrapping int64 add)
  beside its float approximation (`sum_d`); the true sum is the value congruent to
  `sum_l` nearest the approximation, exact while the float's error stays below 2**62
  (about 2**26 points per bucket at the extreme magnitudes; any realistic data).
* A double SUM or AVG adds the points in another grouping than a raw scan does
  (sums of sums), so it may differ from the raw answer by floating-point rounding:
  relative 1e-9 is what the tests allow. A query whose interval equals a level's width
  and whose bucket is wholly rolled up gets the raw scan's very bits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt

from iotmesh.core.types import Aggregation
from iotmesh.storage.aggregate import Buckets
from iotmesh.storage.points import INT64_MAX, INT64_MIN, Kind, Points

ROLLUP = np.dtype(
    [
        ("ts", "<i8"),
        ("count", "<i8"),
        ("num", "<i8"),
        ("longs", "<i8"),
        ("sum_d", "<f8"),
        ("min_d", "<f8"),
        ("max_d", "<f8"),
        ("sum_l", "<i8"),
        ("min_l", "<i8"),
        ("max_l", "<i8"),
    ]
)
RollupArray = npt.NDArray[np.void]

_TWO_64 = 1 << 64


RETENTION_FENCE = "retention"
"""The fenced resource of the retention job: the store keeps the highest token seen."""


class RetentionPolicy(msgspec.Struct, frozen=True):
    """What to expire now, for a store's `apply_retention` (TTLs in ms; 0: forever).

    A point's raw TTL is the longest of the rules that match it (the default, its key's,
    its entity's): a rule can keep data longer than the default, or shorter when it is
    the only one. `levels` maps a rollup level's width to its TTL.
    """

    now_ms: int
    raw_ttl_ms: int = 0
    keys: dict[str, int] = {}
    entities: dict[str, int] = {}
    levels: dict[int, int] = {}
    fencing_token: int | None = None
    """The term's token when a leader-elected job made the policy (`iotmesh serve`): a
    store that can check it in its own transactions refuses a pass whose token is
    older than one it has seen (PostgreSQL; see `RETENTION_FENCE`)."""

    def raw_ttl(self, entity_id: str, key: str) -> int:
        """The raw TTL of one series (ms; 0: forever)."""
        ttls = [self.raw_ttl_ms, self.keys.get(key, -1), self.entities.get(entity_id, -1)]
        if key in self.keys or entity_id in self.entities:
            ttls = [t for t in ttls[1:] if t >= 0]
        return 0 if 0 in ttls else max(ttls)

    def raw_cutoff(self, entity_id: str, key: str, align_ms: int) -> int | None:
        """Raw points with ts < the cutoff expire; None: nothing does.

        Aligned down to `align_ms` (the coarsest rollup level), so that no rollup bucket
        is ever half expired: a late point recomputes a bucket from whole raw data.
        """
        ttl = self.raw_ttl(entity_id, key)
        if ttl <= 0:
            return None
        cutoff = self.now_ms - ttl
        return cutoff - cutoff % align_ms if align_ms > 1 else cutoff


def empty() -> RollupArray:
    return np.empty(0, ROLLUP)


def floor(ts: int, size: int) -> int:
    """The start of the bucket of width `size` holding `ts`."""
    return ts - ts % size


def ceil(ts: int, size: int) -> int:
    """The first bucket start at or after `ts`."""
    return -((-ts) // size) * size


def _runs(keys: npt.NDArray[np.int64]) -> npt.NDArray[np.intp]:
    """Start index of each run of equal values in a sorted array (non-empty)."""
    return np.flatnonzero(np.concatenate(([True], keys[1:] != keys[:-1])))


def compute(points: Points, size: int) -> RollupArray:
    """The rollup buckets of sorted, unique points (only buckets that hold points)."""
    n = len(points)
    if n == 0:
        return empty()
    ts = points.ts
    bucket = ts - ts % size
    starts = _runs(bucket)
    out = np.zeros(len(starts), ROLLUP)
    out["ts"] = bucket[starts]
    out["count"] = np.diff(np.append(starts, n))
    out["min_d"] = np.inf
    out["max_d"] = -np.inf
    out["min_l"] = INT64_MAX
    out["max_l"] = INT64_MIN
    kinds = points.kinds
    numeric = np.flatnonzero(kinds <= Kind.LONG)
    if len(numeric):
        # The same reduceat over the same numeric points as `aggregate.aggregate`: a
        # query bucket equal to one rollup bucket gets the raw answer's bits.
        at, where = _groups(bucket[numeric], out)
        d = points.doubles[numeric]
        out["num"][where] = np.diff(np.append(at, len(numeric)))
        out["sum_d"][where] = np.add.reduceat(d, at)
        out["min_d"][where] = np.minimum.reduceat(d, at)
        out["max_d"][where] = np.maximum.reduceat(d, at)
    long_at = np.flatnonzero(kinds == Kind.LONG)
    if len(long_at):
        assert points.longs is not None
        at, where = _groups(bucket[long_at], out)
        values = points.longs[long_at]
        out["longs"][where] = np.diff(np.append(at, len(long_at)))
        out["sum_l"][where] = np.add.reduceat(values, at)  # wraps modulo 2**64
        out["min_l"][where] = np.minimum.reduceat(values, at)
        out["max_l"][where] = np.maximum.reduceat(values, at)
    return out


def _groups(
    bucket: npt.NDArray[np.int64], out: RollupArray
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    at = _runs(bucket)
    return at, np.searchsorted(out["ts"], bucket[at])


def combine(parts: RollupArray, size: int) -> RollupArray:
    """Combine buckets (sorted by ts, each ts once) into buckets of width `size`.

    `size` must be a multiple of the parts' width (so each part lies in one bucket).
    """
    if len(parts) == 0:
        return empty()
    bucket = parts["ts"] - parts["ts"] % size
    at = _runs(bucket)
    if len(at) == len(parts):
        if np.array_equal(bucket, parts["ts"]):
            return parts  # one part per bucket, already labelled: nothing to do
        out = parts.copy()
        out["ts"] = bucket
        return out
    out = np.zeros(len(at), ROLLUP)
    out["ts"] = bucket[at]
    for field in ("count", "num", "longs", "sum_d", "sum_l"):
        out[field] = np.add.reduceat(parts[field], at)
    for field in ("min_d", "min_l"):
        out[field] = np.minimum.reduceat(parts[field], at)
    for field in ("max_d", "max_l"):
        out[field] = np.maximum.reduceat(parts[field], at)
    return out


_WORDS = ROLLUP.itemsize // 8


def _words(buckets: RollupArray) -> npt.NDArray[np.int64]:
    """Buckets as rows of 8-byte words: numpy copies those rows whole (memcpy), while
    it copies structured records field by field, several times slower."""
    return np.ascontiguousarray(buckets).view(np.int64).reshape(len(buckets), _WORDS)


def take(buckets: RollupArray, which: npt.NDArray[np.intp] | npt.NDArray[np.bool_]) -> RollupArray:
    """`buckets[which]` (indices or a mask), copied as rows of words."""
    return _words(buckets)[which].reshape(-1).view(ROLLUP)


def concat(parts: Sequence[RollupArray]) -> RollupArray:
    """A few bucket arrays joined in the order given, copied as rows of words."""
    if not parts:
        return empty()
    return np.concatenate([_words(p) for p in parts]).reshape(-1).view(ROLLUP)


def concat_sorted(parts: Sequence[RollupArray | bytes]) -> RollupArray:
    """Disjoint bucket arrays (or their bytes) as one array sorted by ts.

    Joined as bytes: `np.concatenate` of structured arrays checks their fields array by
    array, which costs more than the copy itself for the ~170 blocks of a 30-day read.
    """
    data = b"".join(p if isinstance(p, bytes) else p.tobytes() for p in parts)
    joined = np.frombuffer(data, ROLLUP)
    ts = joined["ts"]
    if len(ts) > 1 and bool((ts[1:] < ts[:-1]).any()):
        joined = joined[np.argsort(ts, kind="stable")]
    return joined


def exact_sum(wrapped: int, approx: float) -> int:
    """The true long sum from its value modulo 2**64 and its float approximation."""
    if abs(approx) < 2.0**62:
        return wrapped  # the true sum fits in int64, so wrapping changed nothing
    base = int(approx)
    delta = (wrapped - base) % _TWO_64
    if delta >= 1 << 63:
        delta -= _TWO_64
    return base + delta


def answer(buckets: RollupArray, agg: Aggregation) -> Buckets:
    """The query answer of combined buckets (one per query bucket), by the store rules."""
    if agg is Aggregation.COUNT:
        kept = _where(buckets, buckets["count"] > 0)
        return Buckets(kept["ts"].astype(np.int64), kept["count"].tolist())
    kept = _where(buckets, buckets["num"] > 0)
    ts = kept["ts"].astype(np.int64)
    num = kept["num"]
    is_long = kept["longs"] == num
    every, some = bool(is_long.all()), bool(is_long.any())
    values: list[Any]
    if agg is Aggregation.AVG:
        if every:
            sums = _long_sums(kept)
            values = [s / c for s, c in zip(sums, num.tolist(), strict=True)]
        else:
            values = (kept["sum_d"] / num).tolist()
        return Buckets(ts, values)
    if agg is Aggregation.SUM:
        if not some:
            return Buckets(ts, kept["sum_d"].tolist())
        longs: list[Any] = _long_sums(kept)
        doubles = kept["sum_d"].tolist()
    else:
        suffix = "min" if agg is Aggregation.MIN else "max"
        if not some:
            return Buckets(ts, kept[f"{suffix}_d"].tolist())
        longs = kept[f"{suffix}_l"].tolist()
        if every:
            return Buckets(ts, longs)
        doubles = kept[f"{suffix}_d"].tolist()
    values = [longs[i] if a else doubles[i] for i, a in enumerate(is_long.tolist())]
    return Buckets(ts, values)


def _where(buckets: RollupArray, mask: npt.NDArray[np.bool_]) -> RollupArray:
    """buckets[mask], without a copy when the mask keeps everything (the usual case)."""
    return buckets if bool(mask.all()) else buckets[mask]


def _long_sums(kept: RollupArray) -> list[int]:
    return [
        exact_sum(w, a) for w, a in zip(kept["sum_l"].tolist(), kept["sum_d"].tolist(), strict=True)
    ]


def level_for(levels: Sequence[int], interval_ms: int) -> list[int]:
    """The levels that can answer buckets of `interval_ms`, coarsest first.

    A level can when its width divides the interval: both are aligned to the epoch, so
    every query bucket is then a whole number of level buckets.
    """
    return sorted((size for size in levels if interval_ms % size == 0), reverse=True)
