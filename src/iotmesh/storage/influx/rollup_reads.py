"""Aggregate queries on InfluxDB answered from rollups where they answer exactly.

Planning (one query, all its keys): the coarsest built level whose width divides
`interval_ms` (`rollup.level_for`; both are aligned to the epoch, so a query bucket is
whole level buckets) and that has at least two whole buckets in the range after its TTL
horizon. Its buckets are used where they lie wholly inside [start_ts, end_ts], except
dirty ones (a marker's range covers them: raw points changed since, or not rolled up
yet) and unusable ones (caught half rewritten, or not finite; see `rollups.py`).
Everything else, the range's edges that cut a level bucket and those buckets, is
computed from raw points into partial buckets of the same width; `storage/rollup.py`
combines both kinds per query bucket and applies the aggregation rules.

Order of the reads: markers first, then buckets. The step writes a bucket before it
deletes the markers of its range, so a range without a marker at the first read had
its buckets written whole before the second; a rewrite that starts in between is
caught by the checksum (`rollup_format.py`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from iotmesh.core.types import TsPoint
from iotmesh.storage import aggregate, rollup
from iotmesh.storage.influx.client import literal
from iotmesh.storage.influx.lineproto import decode_tag, encode_tag
from iotmesh.storage.influx.rollup_format import (
    MARKERS,
    SELECT_FIELDS,
    SELECT_LEVELS,
    decode_buckets,
    horizons,
    measurement,
    merge_ranges,
    ns,
    parse_markers,
    tag,
)
from iotmesh.storage.influx.rollups import RawReader, RollupUpkeep
from iotmesh.storage.points import Points, merge
from iotmesh.storage.timeseries import Query

_MIN_BUCKETS = 2  # a level is worth reading for at least this many whole buckets


async def answer(
    upkeep: RollupUpkeep,
    read_raw: RawReader,
    q: Query,
    keys: list[str],
    start: int,
    end: int,
) -> dict[str, list[TsPoint]] | None:
    """Each key's buckets from rollups and raw points; None: no level helps."""
    sizes = rollup.level_for(upkeep.levels, q.interval_ms)
    if not sizes:
        return None
    entity = literal(encode_tag(q.entity_id))
    built, marked = await upkeep.client.query(
        [SELECT_LEVELS, f'SELECT lo, hi FROM {MARKERS} WHERE entity = {entity} GROUP BY "key"'],
        epoch="ns",
    )
    built_levels = horizons(built)
    for size in sizes:
        if size not in built_levels:
            continue
        r0 = max(rollup.ceil(start, size), rollup.ceil(built_levels[size], size))
        r1 = rollup.floor(end + 1, size)
        if r1 - r0 >= _MIN_BUCKETS * size:
            break
    else:
        return None
    wanted = set(keys)
    dirty = [
        (max(rollup.floor(m.lo, size), r0), min(rollup.ceil(m.hi, size), r1))
        for m in parse_markers(marked)
        if m.key is None or m.key in wanted
    ]
    dirty = [(a, b) for a, b in dirty if a < b]
    keys_clause = " OR ".join(tag("key", k) for k in keys)
    (stored,) = await upkeep.client.query(
        [
            f"SELECT {SELECT_FIELDS} FROM {measurement(size)} WHERE entity = {entity}"
            f" AND ({keys_clause}) AND time >= {ns(r0)} AND time <= {ns(r1) - 1}"
            ' GROUP BY "key"'
        ]
    )
    buckets: dict[str, rollup.RollupArray] = {}
    for series in stored:
        good, torn = decode_buckets(series.values)
        buckets[decode_tag(series.tags["key"])] = good
        dirty.extend((int(t), int(t) + size) for t in torn.tolist())
    dirty = merge_ranges(dirty)
    raw_ranges = [(start, r0 - 1), *((a, b - 1) for a, b in dirty), (r1, end)]
    raw: dict[str, list[Points]] = {}
    for a, b in raw_ranges:
        if a > b:
            continue
        for key, found in (await read_raw(q.entity_id, keys, a, b)).items():
            pts = Points.from_values([p.ts for p in found], [p.value for p in found])
            raw.setdefault(key, []).append(pts)
    out: dict[str, list[TsPoint]] = {}
    for key in keys:
        used = _outside(buckets.get(key, rollup.empty()), dirty)
        partial = rollup.compute(merge(raw.get(key, [])), size)
        parts = rollup.concat_sorted([used, partial])
        if not len(parts):
            continue
        aggregate.check_buckets(int(parts["ts"][0]), int(parts["ts"][-1]), q.interval_ms)
        result = rollup.answer(rollup.combine(parts, q.interval_ms), q.agg)
        if answered := aggregate.to_ts_points(result, q.order, q.limit):
            out[key] = answered
    return out


def _outside(buckets: rollup.RollupArray, ranges: Sequence[tuple[int, int]]) -> rollup.RollupArray:
    """The buckets whose start lies in none of the sorted, disjoint [a, b) ranges."""
    if not ranges or not len(buckets):
        return buckets
    bounds = np.array([edge for r in ranges for edge in r], np.int64)
    # An odd position in `bounds` means inside a range.
    inside = np.searchsorted(bounds, buckets["ts"], side="right") % 2 == 1
    kept: rollup.RollupArray = buckets[~inside]
    return kept
