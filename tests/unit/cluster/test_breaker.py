"""The circuit breaker's states, on a fake clock."""

from __future__ import annotations

from iotmesh.cluster.breaker import CircuitBreaker, State


def test_opens_after_consecutive_failures_and_half_opens_after_the_reset() -> None:
    b = CircuitBreaker(failures=3, reset_s=10.0)
    for t in range(2):
        assert b.begin(t)
        b.failure(t)
    assert b.state(2) is State.CLOSED
    b.success()  # a success resets the count
    for t in range(3):
        assert b.begin(t)
        b.failure(t)
    assert b.state(3) is State.OPEN
    assert not b.begin(11.9)
    assert b.state(12.0) is State.HALF_OPEN
    assert b.begin(12.0)  # one trial
    assert not b.begin(12.1)  # and only one
    b.success()
    assert b.state(12.2) is State.CLOSED


def test_a_failed_trial_opens_again() -> None:
    b = CircuitBreaker(failures=1, reset_s=1.0)
    b.failure(0.0)
    assert b.begin(1.0)
    b.failure(1.0)
    assert b.state(1.5) is State.OPEN
    assert b.state(2.0) is State.HALF_OPEN
