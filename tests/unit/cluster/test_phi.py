"""The phi-accrual detector, on a fake clock (times are plain numbers)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iotmesh.cluster.phi import MAX_PHI, PhiAccrualDetector, phi_of, z_of

intervals = st.lists(st.floats(0.01, 10.0), min_size=1, max_size=50)


def beating(times: list[float], **kw: float) -> PhiAccrualDetector:
    d = PhiAccrualDetector(**kw)
    now = 0.0
    d.heartbeat(now)
    for dt in times:
        now += dt
        d.heartbeat(now)
    return d


@given(intervals, st.floats(0.0, 100.0), st.floats(0.0, 100.0))
def test_phi_never_decreases_with_silence(gaps: list[float], a: float, b: float) -> None:
    d = beating(gaps)
    last = d.last_heartbeat
    assert last is not None
    early, late = sorted((a, b))
    assert 0.0 <= d.phi(last + early) <= d.phi(last + late) <= MAX_PHI


@given(intervals, st.floats(0.0, 50.0))
def test_a_heartbeat_resets_suspicion(gaps: list[float], silence: float) -> None:
    d = beating(gaps)
    last = d.last_heartbeat
    assert last is not None
    d.heartbeat(last + silence)
    # Zero silence is at most the median interval: P(late) >= 1/2, phi <= log10(2).
    assert d.phi(last + silence) <= math.log10(2) + 1e-9


@given(st.floats(0.05, 5.0), st.floats(1.0, 16.0), st.floats(0.0, 3.0))
def test_regular_heartbeats_are_trusted_and_silence_crosses_the_threshold_at_the_bound(
    interval: float, threshold: float, pause: float
) -> None:
    d = beating(
        [interval] * 30, threshold=threshold, acceptable_pause=pause, first_interval=interval
    )
    last = d.last_heartbeat
    assert last is not None
    assert d.available(last + interval)  # the next beat on time: no suspicion
    bound = d.detection_bound()
    mean, std = d.stats()
    assert bound == pytest.approx(mean + pause + z_of(threshold) * std)
    assert d.available(last + bound * 0.999 - 1e-9)
    assert not d.available(last + bound * 1.001 + 1e-9)


def test_the_documented_default_bound() -> None:
    # Heartbeats every 1 s, min std 0.2 s, pause 1 s, threshold 8: about 3.1 s.
    d = beating([1.0] * 50, threshold=8.0, min_std_dev=0.2, acceptable_pause=1.0)
    assert d.detection_bound() == pytest.approx(1.0 + 1.0 + 5.612 * 0.2, abs=0.01)


def test_the_window_is_bounded_and_forgets_old_intervals() -> None:
    d = beating([10.0] * 5 + [1.0] * 20, window=20, min_std_dev=0.01)
    mean, std = d.stats()
    assert mean == pytest.approx(1.0)
    assert std == pytest.approx(0.01)


def test_before_any_heartbeat_nothing_is_suspected() -> None:
    d = PhiAccrualDetector()
    assert d.phi(1e9) == 0.0


@given(st.floats(1.0, 30.0))
def test_z_inverts_the_tail(threshold: float) -> None:
    z = z_of(threshold)
    assert phi_of(z, 0.0, 1.0) == pytest.approx(threshold, rel=1e-6)


def test_phi_is_capped_where_the_tail_underflows() -> None:
    assert phi_of(1e6, 1.0, 0.1) == MAX_PHI
    assert math.isfinite(phi_of(1e6, 1.0, 0.1))


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="window"):
        PhiAccrualDetector(window=1)


@given(intervals, st.floats(0.0, 100.0))
def test_the_verdict_follows_phi(gaps: list[float], silence: float) -> None:
    d = beating(gaps, threshold=8.0)
    last = d.last_heartbeat
    assert last is not None
    phi = d.phi(last + silence)
    expected = "failed" if phi >= 8 else "suspect" if phi >= 4 else "alive"
    assert d.verdict(last + silence) == expected
    assert (expected != "failed") == d.available(last + silence)
