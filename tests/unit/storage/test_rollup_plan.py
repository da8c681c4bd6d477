"""The read plan's assembly (`storage/rollup_plan.py`): stored buckets with the pending
ones replaced by raw partials come out in ts order, whether pending buckets were stored
or not, few (pieces joined as views) or scattered (one copy and a sort)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iotmesh.storage import rollup, rollup_plan

buckets = st.sets(st.integers(0, 80)).map(lambda s: np.array(sorted(s), np.int64) * 10)


def records(ts: np.ndarray, count: int) -> rollup.RollupArray:
    out = np.zeros(len(ts), rollup.ROLLUP)
    out["ts"] = ts
    out["count"] = count
    return out


@pytest.mark.parametrize("max_pieces", [256, 2])
# monkeypatch sets the same value for every example of a parametrization: safe to share.
@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(stored=buckets, pending=buckets, drop=st.integers(0, 3))
def test_pending_partials_replace_stored_buckets_in_order(
    monkeypatch: pytest.MonkeyPatch,
    max_pieces: int,
    stored: np.ndarray,
    pending: np.ndarray,
    drop: int,
) -> None:
    monkeypatch.setattr(rollup_plan, "_MAX_PIECES", max_pieces)
    used = records(stored, 1)
    mid = records(pending[drop:], 2)  # a pending bucket may have no raw partial left
    got = rollup.concat(rollup_plan._between(used, mid, pending))
    want = np.sort(np.concatenate([used[~np.isin(stored, pending)], mid]), order="ts")
    assert got.tobytes() == want.tobytes()
