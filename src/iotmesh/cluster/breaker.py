"""A circuit breaker per instance: stop calling one that keeps failing.

    CLOSED --`failures` consecutive failures--> OPEN --`reset_s` later--> HALF_OPEN
    HALF_OPEN --the trial call succeeds--> CLOSED
    HALF_OPEN --the trial call fails--> OPEN (for another `reset_s`)

While OPEN the instance gets no calls; HALF_OPEN lets exactly one call through at a
time. Pure: the time is passed in.
"""

from __future__ import annotations

import enum


class State(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    def __init__(self, failures: int, reset_s: float) -> None:
        self._threshold = failures
        self._reset_s = reset_s
        self._failures = 0
        self._opened_at = 0.0
        self._state = State.CLOSED
        self._trial = False

    def state(self, now: float) -> State:
        if self._state is State.OPEN and now - self._opened_at >= self._reset_s:
            self._state = State.HALF_OPEN
            self._trial = False
        return self._state

    def allows(self, now: float) -> bool:
        """Whether a call may go to the instance now (without taking the trial slot)."""
        state = self.state(now)
        return state is State.CLOSED or (state is State.HALF_OPEN and not self._trial)

    def begin(self, now: float) -> bool:
        """Take permission for one call; False when the breaker refuses it."""
        if not self.allows(now):
            return False
        if self._state is State.HALF_OPEN:
            self._trial = True
        return True

    def success(self) -> None:
        self._failures = 0
        self._state = State.CLOSED
        self._trial = False

    def failure(self, now: float) -> None:
        self._failures += 1
        if self._state is State.HALF_OPEN or self._failures >= self._threshold:
            self._state = State.OPEN
            self._opened_at = now
            self._trial = False
