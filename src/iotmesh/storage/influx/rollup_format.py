"""How rollups are stored in InfluxDB 1.x: bucket points, dirty markers, level state.

    rollup_<width ms>,entity=<e>,key=<k>  count,num,longs,sum_l,min_l,max_l (integers),
                                          sum_d,min_d,max_d (floats), nf, chk  <bucket start>
    rollup_dirty,entity=<e>[,key=<k>]     lo, hi (integers, ms)                <seq, ns>
    rollup_level,level=<width ms>         expired_before (integer, ms)         <0>

* A bucket is a point of its level's measurement holding the fields of one `ROLLUP`
  record; `sum_l` is an integer field, so long sums stay exact. Line protocol has no
  inf/nan: an empty side's min/max sentinels are stored as 0 (restored from `num` and
  `longs`), and a bucket whose double fields are not finite is stored with `nf = 1` and
  answered from raw points. `chk` is a checksum of the other fields: InfluxDB makes a
  point visible one field at a time, so a reader can catch a bucket half rewritten,
  and then answers that bucket from raw points too.
* A dirty marker says "raw points of [lo, hi) ms of this entity (of this key: a delete)
  changed after their buckets were computed". Its time is the `seq` of the write or
  delete that made it (a ns clock, strictly increasing in a process), so the markers
  form a log in write order that the step can clear up to a time it has read.
* `rollup_level` has a point per built level, holding the level's TTL horizon (its
  buckets before it were deleted).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from iotmesh.storage import rollup
from iotmesh.storage.influx.client import Series, literal
from iotmesh.storage.influx.lineproto import decode_tag, encode_tag, escape_tag
from iotmesh.storage.points import INT64_MAX, INT64_MIN

MARKERS = "rollup_dirty"
LEVELS = "rollup_level"
FIELDS = tuple(name for name in rollup.ROLLUP.names or () if name != "ts")
SELECT_FIELDS = ", ".join(f'"{name}"' for name in FIELDS) + ", nf, chk"
SELECT_LEVELS = f'SELECT expired_before FROM {LEVELS} GROUP BY "level"'

# Odd multipliers of the checksum, one per stored column (ts, the 9 fields, nf).
_CHK = np.array([(0x9E3779B97F4A7C15 * (2 * i + 1)) % 2**64 - 2**63 for i in range(11)], np.int64)


def measurement(size: int) -> str:
    """The measurement of a level's buckets."""
    return f"rollup_{size}"


def tag(name: str, value: str) -> str:
    """An InfluxQL tag comparison."""
    return f'"{name}" = {literal(encode_tag(value))}'


def ns(ms: int) -> int:
    return ms * 1_000_000


def horizons(result: list[Series]) -> dict[int, int]:
    """Built levels and their TTL horizons, from `SELECT_LEVELS`."""
    return {int(s.tags["level"]): int(s.values[0][1]) for s in result if s.values}


# -- markers ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Marker:
    """Raw points of [lo, hi) ms changed (of `key`; None: of every key of the entity)."""

    entity: str
    key: str | None
    time_ns: int
    lo: int
    hi: int


def merge_ranges(ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Half-open ranges merged where they touch or overlap, sorted."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def marker_lines(
    ranges: Sequence[tuple[str, str | None, int, int]], seq: int
) -> tuple[list[str], int]:
    """The lines (ns precision) of markers (entity, key, lo, hi); and the seqs they took.

    A series' markers take seq, seq + 1, ...: points of one series need distinct times.
    """
    lines: list[str] = []
    used: dict[tuple[str, str | None], int] = {}
    for entity, key, lo, hi in ranges:
        at = used.get((entity, key), 0)
        used[(entity, key)] = at + 1
        key_tag = "" if key is None else f",key={escape_tag(key)}"
        lines.append(f"{MARKERS},entity={escape_tag(entity)}{key_tag} lo={lo}i,hi={hi}i {seq + at}")
    return lines, max(used.values(), default=0)


def write_ranges(
    entities_ts: Sequence[tuple[str, Sequence[int]]], coarsest: int
) -> list[tuple[str, str | None, int, int]]:
    """A write's dirty ranges: per entity, its runs of touched buckets of the coarsest level."""
    touched: dict[str, set[int]] = {}
    for entity, stamps in entities_ts:
        buckets = touched.setdefault(entity, set())
        buckets.update(ts - ts % coarsest for ts in stamps)
    out: list[tuple[str, str | None, int, int]] = []
    for entity, buckets in touched.items():
        for lo, hi in merge_ranges([(b, b + coarsest) for b in buckets]):
            out.append((entity, None, lo, hi))
    return out


def parse_markers(result: list[Series]) -> list[Marker]:
    """Markers from `SELECT lo, hi FROM rollup_dirty ... GROUP BY entity, "key"` (ns)."""
    out: list[Marker] = []
    for series in result:
        entity = decode_tag(series.tags.get("entity", "%"))
        raw_key = series.tags.get("key", "")
        key = decode_tag(raw_key) if raw_key else None
        for t, lo, hi in series.values:
            if lo is None or hi is None:
                continue  # half visible: a write in flight, which the step leaves anyway
            out.append(Marker(entity, key, int(t), int(lo), int(hi)))
    return out


# -- buckets ---------------------------------------------------------------------------


def _checksum(stored: rollup.RollupArray, nf: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    cols = np.ascontiguousarray(stored).view(np.int64).reshape(-1, 10)
    with np.errstate(over="ignore"):
        total: npt.NDArray[np.int64] = (cols * _CHK[:10]).sum(axis=1) + nf * _CHK[10]
    return total


def bucket_lines(entity: str, key: str, size: int, buckets: rollup.RollupArray) -> list[str]:
    """The points (ms precision) of one series' buckets of one level."""
    if not len(buckets):
        return []
    stored = buckets.copy()
    floats = ("sum_d", "min_d", "max_d")
    bad = np.zeros(len(stored), bool)
    for name in floats:
        stored[name][stored["num"] == 0] = 0.0
        bad |= ~np.isfinite(stored[name])
    for name in floats:
        stored[name][bad] = 0.0
        stored[name] += 0.0  # -0.0 as 0.0: InfluxDB's JSON answers 0 for it
    for name in ("min_l", "max_l"):
        stored[name][stored["longs"] == 0] = 0
    nf = bad.astype(np.int64)
    chk = _checksum(stored, nf).tolist()
    prefix = f"{measurement(size)},entity={escape_tag(entity)},key={escape_tag(key)} "
    lines = []
    for (ts, c, n, lg, sd, mind, maxd, sl, minl, maxl), f, k in zip(
        stored.tolist(), nf.tolist(), chk, strict=True
    ):
        lines.append(
            f"{prefix}count={c}i,num={n}i,longs={lg}i,sum_d={sd!r},min_d={mind!r},"
            f"max_d={maxd!r},sum_l={sl}i,min_l={minl}i,max_l={maxl}i,nf={f}i,chk={k}i {ts}"
        )
    return lines


def decode_buckets(rows: list[list[Any]]) -> tuple[rollup.RollupArray, npt.NDArray[np.int64]]:
    """Buckets from rows of `SELECT <SELECT_FIELDS>` (ms), and the starts of those to
    answer from raw points instead (half visible, or not finite)."""
    n = len(rows)
    out = np.zeros(n, rollup.ROLLUP)
    if not n:
        return out, np.empty(0, np.int64)
    columns = list(zip(*rows, strict=True))
    unusable = np.zeros(n, bool)

    def column(j: int) -> Sequence[Any]:
        col = columns[j]
        if None in col:
            unusable[[i for i, v in enumerate(col) if v is None]] = True
            return [0 if v is None else v for v in col]
        return col

    out["ts"] = column(0)
    for j, name in enumerate(FIELDS, start=1):
        out[name] = column(j)
    nf = np.array(column(len(FIELDS) + 1), np.int64)
    chk = np.array(column(len(FIELDS) + 2), np.int64)
    unusable |= (nf != 0) | (_checksum(out, nf) != chk)
    torn = out["ts"][unusable].astype(np.int64)
    good = out[~unusable] if unusable.any() else out
    good["min_d"][good["num"] == 0] = np.inf
    good["max_d"][good["num"] == 0] = -np.inf
    good["min_l"][good["longs"] == 0] = INT64_MAX
    good["max_l"][good["longs"] == 0] = INT64_MIN
    return good, torn


__all__ = [
    "FIELDS",
    "LEVELS",
    "MARKERS",
    "SELECT_FIELDS",
    "SELECT_LEVELS",
    "Marker",
    "bucket_lines",
    "decode_buckets",
    "horizons",
    "marker_lines",
    "measurement",
    "merge_ranges",
    "ns",
    "parse_markers",
    "tag",
    "write_ranges",
]
