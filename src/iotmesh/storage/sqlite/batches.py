"""Batch rows: what one write transaction stores, as a few columnar `ts_batch` rows.

A write's points are sorted by (series id, ts), one point per (series, ts) (the later
record of the batch wins), and cut at series boundaries into parts of about
`PART_POINTS` points, one row each, with the range of series ids it holds. A part
never spans two series groups (`GROUP_SHIFT`: series ids `g << 8` to `(g + 1) << 8`),
so compaction can move the rows of a few groups at a time into chunks, in short
transactions, instead of every series at once (see `writes.py`). A query
of one series reads only its group's pending rows whose series ids hold it (found
through the index on the series range, then SQLite's `instr` on the `sids` blob),
and slices them all in one vectorised pass (`holding`, `series_points`), not every
series' points. A row holds, in columns:

    sids     int64  the series ids, ascending          (one per series)
    starts   int64  where each series' points start    (one per series, plus the end)
    ts       int64  timestamps                         (one per point)
    kinds    uint8  `Kind` of each point
    doubles  float64  DOUBLE values, LONG as float, 0 elsewhere
    longs    int64  LONG values, BOOL as 0/1, 0 elsewhere; empty when no such point
    objects  msgpack list: STRING/JSON values, None elsewhere; empty when no such point

These are exactly the columns of `points.Points`, so the rows of a query join into
one `Points` with a series id per point, and a mask picks the series. Building the rows
is whole-array work:
`np.lexsort` sorts, and values are converted per kind with one `astype` each.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import compress, pairwise, repeat
from typing import Any

import numpy as np

from iotmesh.storage.points import (
    F64Array,
    I64Array,
    Kind,
    Points,
    U8Array,
    classify,
    last_of_runs,
)
from iotmesh.storage.sqlite.chunks import (
    DECODER,
    ENCODER,
    Chunk,
    encode_points,
    encode_values,
)
from iotmesh.storage.sqlite.schema import latest_param

# Exact Python type -> kind. A value of another type (a subclass, an int outside int64)
# sends the whole batch through `classify`, value by value.
_KIND_OF_TYPE: dict[type, int] = {
    float: Kind.DOUBLE,
    int: Kind.LONG,
    bool: Kind.BOOL,
    str: Kind.STRING,
    dict: Kind.JSON,
    list: Kind.JSON,
    type(None): Kind.JSON,
}


@dataclass(frozen=True, slots=True)
class BatchRow:
    """The parameters of one `ts_batch` insert (one part of a batch), in column order."""

    min_sid: int
    max_sid: int
    min_ts: int
    max_ts: int
    n: int
    sids: bytes
    starts: bytes
    ts: bytes
    kinds: bytes
    doubles: bytes
    longs: bytes | None
    objects: bytes | None


# Points per batch row: small enough that a query reading one series from each pending
# batch reads little (~25 bytes a point), big enough that rows per commit stay few.
PART_POINTS = 256
# Series ids `g << GROUP_SHIFT` .. `((g + 1) << GROUP_SHIFT) - 1` form group g; parts
# are also cut where the group changes.
GROUP_SHIFT = 8

# The stored columns of a batch row: sids, starts, ts, kinds, doubles, longs, objects.
BatchColumns = tuple[bytes, bytes, bytes, bytes, bytes, bytes | None, bytes | None]

# (series id, ts, kind, value as `ts_latest` stores it)
LatestRow = tuple[int, int, int, Any]


def _columns(values: list[Any]) -> tuple[U8Array, F64Array, I64Array | None, list[Any] | None]:
    """kinds, doubles, longs and objects of values in write order (see module docstring)."""
    n = len(values)
    types = list(map(type, values))
    present = set(types)
    try:
        if present == {float}:
            return np.zeros(n, np.uint8), np.array(values, np.float64), None, None
        if present <= {float, int}:
            # The usual mixed batch (21.5 and 40 from JSON): one C-level pass per column.
            is_long = np.fromiter(map(operator.is_, types, repeat(int)), np.bool_, n)
            longs = np.zeros(n, np.int64)
            longs[is_long] = np.fromiter(compress(values, is_long.tolist()), np.int64)
            return is_long.view(np.uint8).copy(), np.array(values, np.float64), longs, None
        if present <= _KIND_OF_TYPE.keys():
            kinds = np.fromiter(map(_KIND_OF_TYPE.__getitem__, types), np.uint8, n)
            return _split(values, kinds)
    except OverflowError:
        pass  # an int outside int64: stored as a double, by `classify`
    pairs = [classify(v) for v in values]
    kinds = np.array([kind for kind, _ in pairs], np.uint8)
    return _split([v for _, v in pairs], kinds)


def _split(
    values: list[Any], kinds: U8Array
) -> tuple[U8Array, F64Array, I64Array | None, list[Any] | None]:
    n = len(values)
    present = np.bincount(kinds, minlength=len(Kind))
    column = np.fromiter(values, object, n)
    doubles = np.zeros(n, np.float64)
    if present[Kind.DOUBLE]:
        mask = kinds == Kind.DOUBLE
        doubles[mask] = column[mask].astype(np.float64)
    longs = None
    if present[Kind.LONG] or present[Kind.BOOL]:
        longs = np.zeros(n, np.int64)
        mask = (kinds == Kind.LONG) | (kinds == Kind.BOOL)
        longs[mask] = column[mask].astype(np.int64)  # OverflowError outside int64
        mask = kinds == Kind.LONG
        doubles[mask] = longs[mask]
    objects = None
    if present[Kind.STRING] or present[Kind.JSON]:
        column[kinds < Kind.STRING] = None
        objects = column.tolist()
    return kinds, doubles, longs, objects


def encode_batch(
    sids: list[int], ts: I64Array, values: list[Any]
) -> tuple[list[BatchRow], list[LatestRow]]:
    """The batch rows of points given in write order, and each series' newest point.

    Args:
        sids, ts, values: one entry per point, in write order.
    """
    kinds, doubles, longs, objects = _columns(values)
    sid = np.array(sids, np.int64)
    order = np.lexsort((ts, sid))  # stable: equal (series, ts) stay in write order
    index = order[last_of_runs(sid[order], ts[order])]
    points = Points(ts, kinds, doubles, longs, objects).take(index)
    sid = sid[index]
    starts = _group_starts(sid)
    series = sid[starts[:-1]]
    latest = _latest_rows(points, series, starts[1:] - 1)
    # Parts are cut at series starts, about PART_POINTS apart and where the series group
    # changes; each part's columns are byte slices of the whole batch's columns.
    n = len(points)
    by_points = np.searchsorted(starts, np.arange(0, n, PART_POINTS))
    series_group = series >> GROUP_SHIFT
    by_group = np.flatnonzero(series_group[1:] != series_group[:-1]) + 1
    cut = np.union1d(by_points, by_group)  # indices into `series` where parts start
    group_bounds = [*cut[cut < len(series)].tolist(), len(series)]
    bounds = starts[group_bounds]
    min_ts = np.minimum.reduceat(points.ts, bounds[:-1]).tolist()
    max_ts = np.maximum.reduceat(points.ts, bounds[:-1]).tolist()
    ts_b = points.ts.astype("<i8", copy=False).tobytes()
    kinds_b = points.kinds.tobytes()
    doubles_b = points.doubles.astype("<f8", copy=False).tobytes()
    longs_b = None if points.longs is None else points.longs.astype("<i8", copy=False).tobytes()
    series_b = series.astype("<i8", copy=False).tobytes()
    rows = []
    for i, (g_lo, g_hi) in enumerate(pairwise(group_bounds)):
        lo, hi = int(bounds[i]), int(bounds[i + 1])
        rows.append(
            BatchRow(
                int(series[g_lo]),
                int(series[g_hi - 1]),
                min_ts[i],
                max_ts[i],
                hi - lo,
                series_b[g_lo * 8 : g_hi * 8],
                (starts[g_lo : g_hi + 1] - lo).astype("<i8").tobytes(),
                ts_b[lo * 8 : hi * 8],
                kinds_b[lo:hi],
                doubles_b[lo * 8 : hi * 8],
                None if longs_b is None else longs_b[lo * 8 : hi * 8],
                None if points.objects is None else ENCODER.encode(points.objects[lo:hi]),
            )
        )
    return rows, latest


def _group_starts(sid: I64Array) -> I64Array:
    """Offsets where each run of equal (sorted) series ids starts, plus the end."""
    bounds = np.flatnonzero(sid[1:] != sid[:-1]) + 1
    return np.concatenate(([0], bounds, [len(sid)])).astype(np.int64)


def _latest_rows(points: Points, sids: I64Array, last: I64Array) -> list[LatestRow]:
    kinds = points.kinds[last]
    values: list[Any] = points.doubles[last].tolist()
    if points.longs is not None:
        where = np.flatnonzero((kinds == Kind.LONG) | (kinds == Kind.BOOL))
        for i, v in zip(where.tolist(), points.longs[last[where]].tolist(), strict=True):
            values[i] = v
    if points.objects is not None:
        for i in np.flatnonzero(kinds >= Kind.STRING).tolist():
            values[i] = latest_param(int(kinds[i]), points.objects[int(last[i])])
    return list(zip(sids.tolist(), points.ts[last].tolist(), kinds.tolist(), values, strict=True))


def holding(sid_columns: Sequence[bytes], sid: int) -> list[int]:
    """Which batch rows hold series `sid`, given each row's `sids` column (ascending).

    One comparison over all the rows' series ids at once. The rows a query gets are
    those whose `sids` bytes contain the id's 8 bytes anywhere; a match that straddles
    two ids is not the id, and this drops such a row.
    """
    sids = np.frombuffer(b"".join(sid_columns), "<i8")
    hits = np.flatnonzero(sids == sid)
    if not len(hits):
        return []
    ends = np.cumsum(np.fromiter(map(len, sid_columns), np.int64, len(sid_columns)) >> 3)
    # A row holds a series at most once, so the rows found are distinct and ascending.
    found: list[int] = np.searchsorted(ends, hits, side="right").tolist()
    return found


def series_points(rows: list[BatchColumns], sid: int) -> Points:
    """The points of series `sid` in batch rows (columns as stored, in id order):
    sorted by ts, the last write of a ts kept, as `merge` wants one part."""
    points, sids = _joined(rows)
    points = points.take(np.flatnonzero(sids == sid))
    ts = points.ts
    if len(rows) > 1 and not bool((ts[1:] > ts[:-1]).all()):
        order = np.argsort(ts, kind="stable")  # equal ts stay in write order
        points = points.take(order[last_of_runs(ts[order])])
    return points


def to_chunks(rows: list[BatchColumns], max_points: int) -> list[tuple[int, Chunk]]:
    """Split batch rows (columns as stored, in id order) into per-series chunks.

    Returns:
        (series id, chunk) pairs.
    """
    points, sid = _joined(rows)
    if len(rows) > 1:
        points, sid = _sort_by_series(points, sid)
    starts = _group_starts(sid)
    firsts, ends = starts[:-1], starts[1:]
    uniform = np.minimum.reduceat(points.kinds, firsts) == np.maximum.reduceat(points.kinds, firsts)
    # Every chunk of a series of one kind is a slice of these: no per-chunk numpy call.
    ts = memoryview(points.ts.astype("<i8", copy=False).tobytes())
    columns = {Kind.DOUBLE: memoryview(points.doubles.astype("<f8", copy=False).tobytes())}
    if points.longs is not None:
        columns[Kind.LONG] = memoryview(points.longs.astype("<i8", copy=False).tobytes())
        columns[Kind.BOOL] = memoryview(points.longs.astype(np.int8).tobytes())
    width = {Kind.DOUBLE: 8, Kind.LONG: 8, Kind.BOOL: 1}
    out: list[tuple[int, Chunk]] = []
    for s, lo, hi, same, code, first_ts, last_ts in zip(
        sid[firsts].tolist(),
        firsts.tolist(),
        ends.tolist(),
        uniform.tolist(),
        points.kinds[firsts].tolist(),
        points.ts[firsts].tolist(),
        points.ts[ends - 1].tolist(),
        strict=True,
    ):
        if not same or hi - lo > max_points:
            out.extend((s, c) for c in encode_points(points.take(slice(lo, hi)), max_points))
            continue
        kind = Kind(code)
        if kind in width:
            w = width[kind]
            vals: bytes | memoryview = columns[kind][lo * w : hi * w]
        else:
            vals = encode_values(points, kind, lo, hi)
        out.append((s, Chunk(kind, hi - lo, first_ts, last_ts, ts[lo * 8 : hi * 8], vals)))
    return out


def _joined(rows: list[BatchColumns]) -> tuple[Points, I64Array]:
    """The points of batch rows one after the other, and each point's series id."""
    ts = np.frombuffer(b"".join(r[2] for r in rows), "<i8").astype(np.int64, copy=False)
    n = len(ts)
    longs = None
    if any(r[5] is not None for r in rows):
        joined = b"".join(bytes(8 * len(r[3])) if r[5] is None else r[5] for r in rows)
        longs = np.frombuffer(joined, "<i8").astype(np.int64, copy=False)
    objects: list[Any] | None = None
    if any(r[6] is not None for r in rows):
        objects = []
        for r in rows:
            objects.extend([None] * len(r[3]) if r[6] is None else DECODER.decode(r[6]))
    points = Points(
        ts,
        np.frombuffer(b"".join(r[3] for r in rows), np.uint8),
        np.frombuffer(b"".join(r[4] for r in rows), "<f8").astype(np.float64, copy=False),
        longs,
        objects,
    )
    # Points per series: the differences of each row's `starts`; where one row ends and
    # the next begins the difference is negative, and is dropped.
    starts = np.frombuffer(b"".join(r[1] for r in rows), "<i8")
    counts = np.diff(starts)
    sids = np.frombuffer(b"".join(r[0] for r in rows), "<i8").astype(np.int64, copy=False)
    sid = np.repeat(sids, counts[counts > 0])
    assert len(sid) == n
    return points, sid


def _sort_by_series(points: Points, sid: I64Array) -> tuple[Points, I64Array]:
    """Points of several batches sorted by (series, ts), the last write of a ts kept."""
    # Each batch is sorted, and batches usually follow each other in time, so a stable
    # sort by series alone is usually enough (and 3x cheaper than a two-key sort).
    order = np.argsort(sid, kind="stable")
    sorted_sid, sorted_ts = sid[order], points.ts[order]
    if bool(((sorted_sid[1:] == sorted_sid[:-1]) & (sorted_ts[1:] <= sorted_ts[:-1])).any()):
        order = np.lexsort((points.ts, sid))  # stable: equal (series, ts) in write order
        sorted_sid, sorted_ts = sid[order], points.ts[order]
        keep = last_of_runs(sorted_sid, sorted_ts)
        order, sorted_sid = order[keep], sorted_sid[keep]
    return points.take(order), sorted_sid
