"""A query reads one series' points out of many pending batch rows in one vectorised
pass (`batches.holding`, `batches.series_points`); it must give what the rows say,
read one by one: sorted, and the last write of a timestamp kept."""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from iotmesh.storage.sqlite.batches import BatchColumns, encode_batch, holding, series_points

Point = tuple[int, int, Any]  # (series id, ts, value)

values = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.integers(-(2**63), 2**63 - 1),
    st.booleans(),
    st.text(max_size=5),
)
# Few series, on both sides of a series-group boundary (256), so that commits share them.
series = st.one_of(st.integers(0, 6), st.integers(253, 259))
point = st.tuples(series, st.integers(0, 30), values)


def columns(batch: list[Point]) -> list[BatchColumns]:
    rows, _ = encode_batch(
        [p[0] for p in batch], np.array([p[1] for p in batch], np.int64), [p[2] for p in batch]
    )
    return [(r.sids, r.starts, r.ts, r.kinds, r.doubles, r.longs, r.objects) for r in rows]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(point, min_size=1, max_size=40), min_size=1, max_size=8), st.data())
def test_one_series_from_many_rows_matches_a_replay(
    commits: list[list[Point]], data: st.DataObject
) -> None:
    sid = data.draw(st.sampled_from([p[0] for c in commits for p in c] + [600]))
    rows = [row for batch in commits for row in columns(batch)]
    expected: dict[int, Any] = {}
    for batch in commits:
        for s, ts, value in batch:
            if s == sid:
                expected[ts] = value
    found = holding([row[0] for row in rows], sid)
    assert found == sorted(found)
    if not expected:
        assert found == []
        return
    points = series_points([rows[i] for i in found], sid)
    assert len(points) == len(expected)
    got = dict(zip(points.ts.tolist(), points.values(), strict=True))
    assert list(got) == sorted(expected)
    assert got == expected
    assert all(type(got[ts]) is type(expected[ts]) for ts in expected)


def test_a_byte_match_across_two_ids_is_not_the_id() -> None:
    """SQLite's `instr` finds 256's bytes (00 01 00 ..) in the ids [0, 1], 7 bytes in."""
    straddling = np.array([0, 1], "<i8").tobytes()
    assert (256).to_bytes(8, "little") in straddling
    holding_256 = np.array([5, 256], "<i8").tobytes()
    assert holding([straddling, holding_256], 256) == [1]
