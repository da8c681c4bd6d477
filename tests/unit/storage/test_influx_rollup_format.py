"""The InfluxDB rollup storage format: buckets round-trip exactly through their lines,
a half-rewritten bucket is caught, and a write's markers cover what it touched."""

from __future__ import annotations

import math
import re

import numpy as np

from iotmesh.storage import rollup
from iotmesh.storage.influx.rollup_format import (
    FIELDS,
    bucket_lines,
    decode_buckets,
    marker_lines,
    merge_ranges,
    write_ranges,
)
from iotmesh.storage.points import Points


def _rows(lines: list[str]) -> list[list[object]]:
    """What InfluxDB answers for the lines (fields in SELECT order), parsed naively."""
    rows = []
    for line in lines:
        _, fields, ts = line.rsplit(" ", 2)
        values = dict(f.split("=") for f in fields.split(","))
        row: list[object] = [int(ts)]
        for name in (*FIELDS, "nf", "chk"):
            text = values[name]
            row.append(int(text[:-1]) if text.endswith("i") else float(text))
        rows.append(row)
    return rows


def test_buckets_round_trip_exactly() -> None:
    points = Points.from_values(
        [0, 1, 5, 12, 13, 20, 31],
        [1.25, 2**62, "s", -3, 0.1, True, -(2**62)],
    )
    buckets = rollup.compute(points, 10)
    lines = bucket_lines("dev 1", "k", 10, buckets)
    assert all(re.match(r"rollup_10,entity=dev\\ 1,key=k count=", line) for line in lines)
    got, torn = decode_buckets(_rows(lines))
    assert len(torn) == 0
    assert got.tobytes() == buckets.tobytes()


def test_a_half_rewritten_or_non_finite_bucket_is_answered_from_raw() -> None:
    buckets = rollup.compute(Points.from_values([0, 10, 20], [1.0, 2.0, math.inf]), 10)
    rows = _rows(bucket_lines("d", "k", 10, buckets))
    rows[1][4] = 7.5  # sum_d of another version of the bucket: its chk disagrees
    rows[0][5] = None  # min_d not visible yet
    got, torn = decode_buckets(rows)
    assert len(got) == 0
    assert torn.tolist() == [0, 10, 20]  # 20: inf is not stored, nf = 1


def test_markers_cover_the_touched_buckets_of_the_coarsest_level() -> None:
    ranges = write_ranges([("a", [5, 3_600_001, 11_000_000]), ("b", [10])], 3_600_000)
    assert ranges == [  # runs of touched buckets
        ("a", None, 0, 7_200_000),
        ("a", None, 10_800_000, 14_400_000),
        ("b", None, 0, 3_600_000),
    ]
    lines, used = marker_lines([*ranges, ("b", "k", 1, 2)], 1000)
    assert used == 2  # a series' markers need distinct times
    assert lines[-1] == "rollup_dirty,entity=b,key=k lo=1i,hi=2i 1000"
    assert merge_ranges([(5, 9), (0, 5), (20, 30)]) == [(0, 9), (20, 30)]
    assert np.array_equal(np.array(merge_ranges([])), np.array([]))
