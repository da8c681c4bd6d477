"""How an aggregate query is answered from rollups and raw points: the backend-neutral plan.

A backend stores rollup buckets (`storage/rollup.py`) its own way and knows, per level,
from when to when its buckets may be used (`Usable`). This module decides the rest, so
every backend answers alike:

* `choose`: the coarsest level whose width divides `interval_ms` (so each query bucket
  is whole level buckets; both are aligned to the epoch) that has at least two whole
  level buckets inside both the query range and the usable range: [r0, r1).
* `Plan.pending`: level buckets in [r0, r1) holding a point the stored rollups do not
  include yet (SQLite: in a batch row; PostgreSQL: in a `ts_points` row). Those are
  computed from raw points, like the range's edges outside [r0, r1).
* `Plan.raw_spans`: the ts spans whose raw points the backend must read for that.
* `answer`: stored buckets inside [r0, r1) but not pending, plus partial buckets of the
  same width computed from the raw points elsewhere, combined into query buckets with
  the store rules applied (`rollup.combine`, `rollup.answer`).

A backend reads everything it passes here inside the query's one read transaction, so
rollups, their bounds and raw points are of one commit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from iotmesh.storage import aggregate as agg
from iotmesh.storage import rollup
from iotmesh.storage.points import I64Array, Points
from iotmesh.storage.timeseries import Query

# A level's usable bucket range for one series, [from, until); None: not usable at all.
Usable = Callable[[int], "tuple[int, int] | None"]


@dataclass(frozen=True, slots=True)
class Plan:
    """Level buckets of width `size` in [r0, r1) come from stored rollups."""

    size: int
    r0: int
    r1: int

    def pending(self, recent: Sequence[I64Array]) -> I64Array:
        """The level buckets in [r0, r1) holding one of the `recent` timestamps (points
        the stored rollups do not include yet), ascending."""
        inside = [ts[(ts >= self.r0) & (ts < self.r1)] for ts in recent]
        joined = np.concatenate([*inside, np.empty(0, np.int64)])
        return np.unique(joined // self.size * self.size)

    def raw_spans(self, q: Query, pending: I64Array) -> list[tuple[int, int]]:
        """The [first, last] ts spans whose raw points `answer` needs: the range's edges
        outside [r0, r1) and the pending buckets."""
        spans = [(q.start_ts, self.r0 - 1), (self.r1, q.end_ts)]
        spans += [(b, b + self.size - 1) for b in pending.tolist()]
        return [(a, b) for a, b in spans if a <= b]


def choose(levels: Sequence[int], q: Query, usable: Usable) -> Plan | None:
    """The plan of one key; None: no level helps (answer from raw points)."""
    for size in rollup.level_for(levels, q.interval_ms):
        bounds = usable(size)
        if bounds is None:
            continue
        r0 = max(rollup.ceil(q.start_ts, size), bounds[0])
        r1 = min(rollup.floor(q.end_ts + 1, size), bounds[1])
        if r1 - r0 >= 2 * size:  # worth it: at least two whole buckets
            return Plan(size, r0, r1)
    return None


def answer(
    q: Query, plan: Plan, stored: rollup.RollupArray, points: Points, pending: I64Array
) -> agg.Buckets:
    """The buckets of one key.

    Args:
        stored: the level's stored buckets, sorted by ts, covering at least [r0, r1)
            (whole storage blocks: the ones outside are left out here).
        points: raw points (the query's window) covering at least `plan.raw_spans`;
            the ones inside [r0, r1) that are not in a pending bucket are left out.
        pending: `plan.pending` of the points the stored rollups do not include.
    """
    r0, r1 = plan.r0, plan.r1
    lo, hi = np.searchsorted(stored["ts"], [r0, r1])
    used = stored[lo:hi]  # a view
    raw = _raw_partials(points, plan, pending)
    # Raw partials before r0 go first, the ones from r1 on last, pending ones (inside
    # [r0, r1)) between the runs of stored buckets they replace: one copy, in order.
    cut0, cut1 = (int(i) for i in np.searchsorted(raw["ts"], [r0, r1]))
    pieces = [raw[:cut0], *_between(used, raw[cut0:cut1], pending), raw[cut1:]]
    parts = rollup.concat(pieces)
    if len(parts):
        agg.check_buckets(int(parts["ts"][0]), int(parts["ts"][-1]), q.interval_ms)
    return rollup.answer(rollup.combine(parts, q.interval_ms), q.agg)


_MAX_PIECES = 256  # runs of stored buckets worth copying one by one


def _between(
    used: rollup.RollupArray, mid: rollup.RollupArray, pending: I64Array
) -> list[rollup.RollupArray]:
    """The stored buckets but the pending ones, and the raw partials `mid` of the
    pending ones, as pieces in ts order (views where possible: pending buckets are
    usually a run at the end, the series' newest hour or so)."""
    if not len(pending):
        return [used, mid]
    kept = ~_in_sorted(used["ts"], pending)
    # Where each run of partials goes among the stored buckets (before used[at]).
    at = np.searchsorted(used["ts"], mid["ts"])
    groups = np.flatnonzero(np.diff(at, prepend=-1))  # the first partial of each run
    edges = np.flatnonzero(np.diff(np.concatenate(([1], kept.view(np.int8), [1]))))
    cuts = np.union1d(edges, at[groups])
    if len(cuts) > _MAX_PIECES:  # scattered: one copy, then one sort
        joined = rollup.concat([rollup.take(used, kept), mid])
        return [rollup.take(joined, np.argsort(joined["ts"], kind="stable"))]
    # (position among the stored buckets, partials before stored ones, piece)
    keyed = [
        (start, 1, piece)
        for start, piece in zip([0, *cuts.tolist()], np.split(used, cuts), strict=True)
        if len(piece) and kept[start]
    ]
    if len(mid):
        keyed += [
            (int(at[first]), 0, piece)
            for first, piece in zip(groups.tolist(), np.split(mid, groups[1:]), strict=True)
        ]
    keyed.sort(key=lambda k: k[:2])
    return [piece for _, _, piece in keyed]


def _in_sorted(values: I64Array, ascending: I64Array) -> npt.NDArray[np.bool_]:
    """Which of `values` are in `ascending` (sorted, unique, not empty): a binary search
    each, cheaper than `np.isin` for a few pending buckets among many."""
    at = np.minimum(np.searchsorted(ascending, values), len(ascending) - 1)
    return ascending[at] == values  # type: ignore[no-any-return]


def _raw_partials(points: Points, plan: Plan, pending: I64Array) -> rollup.RollupArray:
    """Level-width partial buckets of the raw points the stored rollups do not cover."""
    if not len(points):
        return rollup.empty()
    ts = points.ts
    covered = (ts >= plan.r0) & (ts < plan.r1)
    if len(pending):
        covered &= ~np.isin(ts - ts % plan.size, pending)
    if covered.any():
        points = points.take(np.flatnonzero(~covered))
    return rollup.compute(points, plan.size)


__all__ = ["Plan", "Usable", "answer", "choose"]
