"""Points of one series as numpy columns: the form every backend reads a series into.

A backend reads a series however it stores it and hands it to `aggregate.py` as
`Points`: timestamps ascending and unique, each point's `Kind`, and its value in the
column of its kind:

    kind     value column   Python type
    DOUBLE   doubles        float
    LONG     longs          int (also in `doubles`, as a float, for mixed buckets)
    BOOL     longs (0/1)    bool
    STRING   objects        str
    JSON     objects        dict, list or None

`merge` combines parts read from several places (chunks, batches) in write order, so
that the last write of a timestamp wins.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt

I64Array: TypeAlias = npt.NDArray[np.int64]
F64Array: TypeAlias = npt.NDArray[np.float64]
U8Array: TypeAlias = npt.NDArray[np.uint8]

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1


class Kind(enum.IntEnum):
    """The stored type of a value. The numbers are persisted: never renumber."""

    DOUBLE = 0
    LONG = 1
    BOOL = 2
    STRING = 3
    JSON = 4


def classify(value: Any) -> tuple[Kind, Any]:
    """Return the kind of a telemetry value and the value as that kind stores it.

    bool is checked before int (bool is an int subclass, but `true` is not the long 1).
    Ints outside int64 become doubles, like ThingsBoard; an int too large even for a
    double becomes an infinity of its sign.
    """
    t = type(value)
    if t is float:
        return Kind.DOUBLE, value
    if t is bool:
        return Kind.BOOL, value
    if t is int:
        if INT64_MIN <= value <= INT64_MAX:
            return Kind.LONG, value
        return Kind.DOUBLE, _int_to_float(value)
    if t is str:
        return Kind.STRING, value
    # Subclasses (IntEnum, StrEnum, ...): stored as their base type.
    if isinstance(value, bool):
        return Kind.BOOL, bool(value)
    if isinstance(value, int):
        return classify(int(value))
    if isinstance(value, float):
        return Kind.DOUBLE, float(value)
    if isinstance(value, str):
        return Kind.STRING, str(value)
    return Kind.JSON, value


def _int_to_float(value: int) -> float:
    try:
        return float(value)
    except OverflowError:
        return float("inf") if value > 0 else float("-inf")


@dataclass(frozen=True, slots=True)
class Points:
    """The points of one series, in columns; `ts` is ascending and unique.

    Attributes:
        ts: timestamps, Unix ms.
        kinds: each point's `Kind`.
        doubles: DOUBLE values, and LONG values as floats; 0.0 for other kinds.
        longs: LONG values, and BOOL as 0/1; 0 elsewhere. None when no point is a LONG
            or BOOL (saves a column of zeros on the common all-double series).
        objects: STRING and JSON values at their positions (None elsewhere); None when
            there is no such point.
    """

    ts: I64Array
    kinds: U8Array
    doubles: F64Array
    longs: I64Array | None
    objects: list[Any] | None

    def __len__(self) -> int:
        return len(self.ts)

    @classmethod
    def empty(cls) -> Points:
        return cls(
            np.empty(0, np.int64), np.empty(0, np.uint8), np.empty(0, np.float64), None, None
        )

    @classmethod
    def from_values(cls, ts: Sequence[int], values: Sequence[Any]) -> Points:
        """Build from points in write order: sorted by ts, the last write of a ts wins."""
        last = dict(zip(ts, range(len(ts)), strict=True))
        order = sorted(last)
        n = len(order)
        kinds = np.empty(n, np.uint8)
        doubles = np.zeros(n, np.float64)
        longs: I64Array | None = None
        objects: list[Any] | None = None
        for i, t in enumerate(order):
            kind, value = classify(values[last[t]])
            kinds[i] = kind
            if kind is Kind.DOUBLE:
                doubles[i] = value
            elif kind is Kind.LONG or kind is Kind.BOOL:
                if longs is None:
                    longs = np.zeros(n, np.int64)
                longs[i] = int(value)
                if kind is Kind.LONG:
                    doubles[i] = float(value)
            else:
                if objects is None:
                    objects = [None] * n
                objects[i] = value
        return cls(np.array(order, np.int64), kinds, doubles, longs, objects)

    def take(self, index: npt.NDArray[np.intp] | slice) -> Points:
        """The points at `index` (a slice or an index array)."""
        objects = self.objects
        if objects is not None:
            if isinstance(index, slice):
                objects = objects[index]
            else:
                objects = [objects[i] for i in index.tolist()]
        return Points(
            self.ts[index],
            self.kinds[index],
            self.doubles[index],
            None if self.longs is None else self.longs[index],
            objects,
        )

    def window(self, start_ts: int, end_ts: int) -> Points:
        """The points with start_ts <= ts <= end_ts."""
        lo = int(np.searchsorted(self.ts, start_ts, side="left"))
        hi = int(np.searchsorted(self.ts, end_ts, side="right"))
        if lo == 0 and hi == len(self.ts):
            return self
        return self.take(slice(lo, hi))

    def values(self, lo: int = 0, hi: int | None = None) -> list[Any]:
        """The Python values of points lo..hi, each in its stored type."""
        hi = len(self.ts) if hi is None else hi
        kinds = self.kinds[lo:hi]
        present = np.bincount(kinds, minlength=len(Kind)).nonzero()[0].tolist()
        if len(present) == 1:
            return self._column(Kind(present[0]), lo, hi)
        out: list[Any] = [None] * (hi - lo)
        for code in present:
            kind = Kind(code)
            where = np.flatnonzero(kinds == code)
            column = self._column(kind, lo, hi)
            for i in where.tolist():
                out[i] = column[i]
        return out

    def _column(self, kind: Kind, lo: int, hi: int) -> list[Any]:
        if kind is Kind.DOUBLE:
            return self.doubles[lo:hi].tolist()  # type: ignore[no-any-return]
        if kind is Kind.LONG:
            assert self.longs is not None
            return self.longs[lo:hi].tolist()  # type: ignore[no-any-return]
        if kind is Kind.BOOL:
            assert self.longs is not None
            return self.longs[lo:hi].astype(np.bool_).tolist()  # type: ignore[no-any-return]
        assert self.objects is not None
        return self.objects[lo:hi]


def concat(parts: Sequence[Points]) -> Points:
    """The points of every part, one after the other (no sorting)."""
    if len(parts) == 1:
        return parts[0]
    longs = None
    if any(p.longs is not None for p in parts):
        longs = np.concatenate(
            [np.zeros(len(p), np.int64) if p.longs is None else p.longs for p in parts]
        )
    objects: list[Any] | None = None
    if any(p.objects is not None for p in parts):
        objects = []
        for p in parts:
            objects.extend([None] * len(p) if p.objects is None else p.objects)
    return Points(
        np.concatenate([p.ts for p in parts]),
        np.concatenate([p.kinds for p in parts]),
        np.concatenate([p.doubles for p in parts]),
        longs,
        objects,
    )


def merge(parts: Sequence[Points]) -> Points:
    """Merge parts that are each sorted and unique, given in write order.

    Where parts share a ts, the later part's point wins (last write wins).
    """
    parts = [p for p in parts if len(p)]
    if not parts:
        return Points.empty()
    by_start = sorted(range(len(parts)), key=lambda i: int(parts[i].ts[0]))
    if all(parts[a].ts[-1] < parts[b].ts[0] for a, b in pairwise(by_start)):
        # Disjoint (in-order data, compacted chunks): one copy per column, no sort.
        return concat([parts[i] for i in by_start])
    merged = concat(parts)
    # A stable sort keeps write order among equal ts: the last of a run is the newest.
    order = np.argsort(merged.ts, kind="stable")
    return merged.take(order[last_of_runs(merged.ts[order])])


def last_of_runs(*keys: npt.NDArray[Any]) -> npt.NDArray[np.bool_]:
    """Mask of the last element of each run of equal rows of sorted `keys`."""
    n = len(keys[0])
    keep = np.ones(n, np.bool_)
    if n > 1:
        same = keys[0][1:] == keys[0][:-1]
        for key in keys[1:]:
            same &= key[1:] == key[:-1]
        keep[:-1] = ~same
    return keep
