"""Phi-accrual failure detection (Hayashibara et al., 2004), pure and clock-free.

Instead of "dead after N seconds", the detector says how surprised it is by the
silence: it keeps the last `window` intervals between heartbeats, models the next
interval as normal with their mean and standard deviation (at least `min_std_dev`),
and after `t` seconds of silence reports

    phi(t) = -log10(P(interval > t)) = -log10(1 - F((t - mean - pause) / std))

so phi = 1 means a 10 % chance that the heartbeat is merely late, phi = 8 one in 10^8.
`acceptable_pause` shifts the curve: that much extra silence (a GC pause, a busy
event loop) raises no suspicion. An instance is *available* while phi is below the
threshold.

The bound: with regular heartbeats every `interval` the mean is `interval` and the
std `min_std_dev` (or more, if heartbeats jitter), so phi crosses `threshold` after

    interval + acceptable_pause + z(threshold) * std        of silence,

z(threshold) being the normal quantile with tail 10^-threshold (z(8) = 5.61,
z(4) = 3.72). `detection_bound()` computes it for the current history. Callers add
their own observation delay (how often they look at heartbeats).

Time is passed in (seconds, any monotonic origin), so tests use a fake clock.
"""

from __future__ import annotations

import math
from collections import deque

MAX_PHI = 1000.0  # where the tail underflows to 0 (phi above ~308 is "certainly dead")


def _tail(z: float) -> float:
    """P(Z > z) for a standard normal Z."""
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def phi_of(elapsed: float, mean: float, std: float) -> float:
    """Phi of `elapsed` seconds of silence for intervals ~ N(mean, std)."""
    p = _tail((elapsed - mean) / std)
    if p <= 0.0:
        return MAX_PHI
    return min(MAX_PHI, max(0.0, -math.log10(p)))


def z_of(threshold: float) -> float:
    """The z with P(Z > z) = 10^-threshold (bisection; no scipy needed)."""
    target = 10.0**-threshold
    lo, hi = -10.0, 40.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if _tail(mid) > target:
            lo = mid
        else:
            hi = mid
    return hi


class PhiAccrualDetector:
    """Suspicion of one monitored instance, from the heartbeats seen of it."""

    def __init__(
        self,
        *,
        threshold: float = 8.0,
        window: int = 100,
        min_std_dev: float = 0.2,
        acceptable_pause: float = 0.0,
        first_interval: float = 1.0,
    ) -> None:
        if threshold <= 0 or window < 2 or min_std_dev <= 0 or first_interval <= 0:
            raise ValueError("threshold, min_std_dev, first_interval > 0 and window >= 2")
        self.threshold = threshold
        self.min_std_dev = min_std_dev
        self.acceptable_pause = acceptable_pause
        self._first = first_interval
        self._intervals: deque[float] = deque(maxlen=window)
        self._sum = 0.0
        self._squares = 0.0
        self._last: float | None = None

    @property
    def last_heartbeat(self) -> float | None:
        return self._last

    def _push(self, interval: float) -> None:
        if len(self._intervals) == self._intervals.maxlen:
            old = self._intervals[0]
            self._sum -= old
            self._squares -= old * old
        self._intervals.append(interval)
        self._sum += interval
        self._squares += interval * interval

    def heartbeat(self, now: float) -> None:
        """Record a heartbeat seen at `now`."""
        if self._last is None:
            # Seed the history as if heartbeats had come at the expected interval with
            # some spread, so the first real silence is judged sensibly.
            self._push(self._first - self._first / 4)
            self._push(self._first + self._first / 4)
        elif now >= self._last:
            self._push(now - self._last)
        self._last = now if self._last is None else max(self._last, now)

    def stats(self) -> tuple[float, float]:
        """(mean, std) of the intervals, std at least `min_std_dev`."""
        n = len(self._intervals)
        if n == 0:
            return self._first, max(self._first / 4, self.min_std_dev)
        mean = self._sum / n
        variance = max(0.0, self._squares / n - mean * mean)
        return mean, max(math.sqrt(variance), self.min_std_dev)

    def phi(self, now: float) -> float:
        """Suspicion after the silence since the last heartbeat (0 before the first)."""
        if self._last is None:
            return 0.0
        mean, std = self.stats()
        return phi_of(max(0.0, now - self._last), mean + self.acceptable_pause, std)

    def available(self, now: float) -> bool:
        return self.phi(now) < self.threshold

    def verdict(self, now: float) -> str:
        """Alive, suspect (phi past half the threshold: still in rotation, worth
        showing) or "failed" (phi at or past the threshold: out of rotation)."""
        return verdict(self.phi(now), self.threshold)

    def detection_bound(self) -> float:
        """Seconds of silence after which phi reaches the threshold, for this history."""
        mean, std = self.stats()
        return mean + self.acceptable_pause + z_of(self.threshold) * std


def verdict(phi: float, threshold: float) -> str:
    """See `PhiAccrualDetector.verdict`."""
    if phi >= threshold:
        return "failed"
    return "suspect" if phi >= threshold / 2 else "alive"
