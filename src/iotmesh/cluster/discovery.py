"""Discovery client: the live instances of a service, and calls to them with failover.

`Discovery` reads the registry every `poll_s` (a quarter of the heartbeat interval by
default). A record whose `seq` changed is a heartbeat seen now; one phi-accrual
detector per instance (`phi.py`) turns the silence since into suspicion, and an
instance whose phi reached `cluster.phi_threshold` is out of rotation at once, before
the engine's TTL deletes its record. It comes back with its next heartbeat. So a dead
instance stops getting calls, counted from its last heartbeat, after at most

    detection_bound() + 2 * poll_s
    ≈ heartbeat_interval + acceptable_pause + z(phi_threshold) * std + 2 * poll_s

(one poll to see the last heartbeat, one to see phi cross the threshold; defaults:
1 + 1 + 5.61 * 0.2 + 0.5 ≈ 3.6 s), and leaves the registry after `ttl_s`.

`call(fn, key=...)` is the proxyless service mesh: it picks an instance with the
policy, runs `fn(instance)` under `call_timeout_s`, and on a retryable failure waits
a jittered exponential back-off and tries another instance, at most `call_retries`
more times. Each instance has a circuit breaker (`breaker.py`); an open breaker takes
the instance out of rotation for `breaker_reset_s`, then one trial call decides.

Error handling: a registry read that fails is logged and the last view is kept, judged
as of the last successful read: heartbeats travel through the engine, so an engine
outage says nothing about the instances, and the client keeps calling them (their
breakers still take out those that fail). `call` raises
`NoInstance` (an `Overloaded`: retry later) when nothing usable is left and
`CallFailed` when every attempt failed; a non-retryable error is raised as it is.

Resource handling: one named polling task, cancelled in `stop`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from iotmesh.cluster.balance import POLICIES, Policy
from iotmesh.cluster.breaker import CircuitBreaker, State
from iotmesh.cluster.errors import CallFailed, NoInstance
from iotmesh.cluster.model import Instance
from iotmesh.cluster.phi import PhiAccrualDetector
from iotmesh.cluster.registry import Registry
from iotmesh.core.lifecycle import Health, Service, cancel_task
from iotmesh.core.settings import ClusterSettings

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class Member:
    """What this client knows of one instance."""

    instance: Instance
    detector: PhiAccrualDetector
    breaker: CircuitBreaker


@dataclass(frozen=True)
class MemberView:
    instance: Instance
    phi: float
    alive: bool  # in rotation as far as the failure detector goes
    state: str  # "alive", "suspect" or "failed" (`PhiAccrualDetector.verdict`)
    breaker: State


def make_detector(settings: ClusterSettings, interval_s: float) -> PhiAccrualDetector:
    """A detector with the settings' parameters for heartbeats every `interval_s`."""
    return PhiAccrualDetector(
        threshold=settings.phi_threshold,
        window=settings.phi_window,
        min_std_dev=settings.phi_min_std_dev_s,
        acceptable_pause=settings.acceptable_pause_s,
        first_interval=interval_s,
    )


def _retry_everything(exc: BaseException) -> bool:
    return True


class Discovery(Service):
    """The instances of one service as this process sees them; see the module docstring."""

    def __init__(
        self,
        registry: Registry,
        service: str,
        settings: ClusterSettings,
        *,
        policy: str | Policy = "round_robin",
        poll_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.name = f"discovery.{service}"
        self.service = service
        self.settings = settings
        self._registry = registry
        self.policy = POLICIES[policy]() if isinstance(policy, str) else policy
        self.poll_s = poll_s if poll_s is not None else settings.heartbeat_interval_s / 4
        self._clock = clock
        self._rng = rng
        self._members: dict[str, Member] = {}
        self._outstanding: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None
        self._read_ok = False
        self._read_at = 0.0  # clock() of the last successful registry read
        self._counts = {"calls": 0, "attempts": 0, "failures": 0, "failovers": 0}

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._poll(), name=self.name)

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_task(task)

    def health(self) -> Health:
        return Health(ok=self._read_ok, detail="" if self._read_ok else "registry unreadable")

    def stats(self) -> dict[str, int]:
        return {**self._counts, "alive": len(self.alive())}

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.refresh()
            except Exception:
                log.warning("%s: reading the registry failed", self.name, exc_info=True)

    async def refresh(self) -> None:
        """Read the registry once and feed the heartbeats seen to the detectors."""
        try:
            records = await self._registry.list(self.service)
        except Exception:
            self._read_ok = False
            raise
        self._read_ok = True
        self.observe(records)

    def observe(self, records: list[Instance]) -> None:
        """Take a registry listing (read at `clock()` now)."""
        now = self._read_at = self._clock()
        seen = set()
        for record in records:
            seen.add(record.key)
            member = self._members.get(record.key)
            if member is None or record.started_ms != member.instance.started_ms:
                member = Member(
                    record,
                    make_detector(self.settings, record.interval_s),
                    CircuitBreaker(self.settings.breaker_failures, self.settings.breaker_reset_s),
                )
                self._members[record.key] = member
                member.detector.heartbeat(now)
            elif record.seq != member.instance.seq:
                member.detector.heartbeat(now)
            member.instance = record
        for key in self._members.keys() - seen:  # expired (TTL) or deregistered
            del self._members[key]

    def members(self) -> list[MemberView]:
        """Every registered instance with its phi, alive or not."""
        now, seen = self._clock(), self._read_at
        return [
            MemberView(
                m.instance,
                m.detector.phi(seen),
                m.detector.available(seen),
                m.detector.verdict(seen),
                m.breaker.state(now),
            )
            for _, m in sorted(self._members.items())
        ]

    def alive(self) -> list[Instance]:
        """Instances in rotation: heartbeats on time, not draining, breaker not open."""
        now, seen = self._clock(), self._read_at
        return [
            m.instance
            for _, m in sorted(self._members.items())
            if m.detector.available(seen)
            and m.instance.health != "draining"
            and m.breaker.allows(now)
        ]

    def pick(self, key: str | None = None, exclude: frozenset[str] = frozenset()) -> Instance:
        """The instance the policy chooses among the alive ones not in `exclude`."""
        candidates = [i for i in self.alive() if i.key not in exclude]
        if not candidates:
            raise NoInstance(self.service, retry_after=self.poll_s)
        return self.policy.choose(candidates, key, self._outstanding)

    async def call(
        self,
        fn: Callable[[Instance], Awaitable[T]],
        *,
        key: str | None = None,
        retryable: Callable[[BaseException], bool] = _retry_everything,
        timeout: float | None = None,
    ) -> T:
        """Run `fn` on an instance, failing over to others; see the module docstring.

        Raises:
            NoInstance: no usable instance (left) to try.
            CallFailed: every attempt failed with a retryable error.
            Exception: what `fn` raised, when `retryable` says it is final.
        """
        self._counts["calls"] += 1
        tried: set[str] = set()
        failures: list[tuple[str, str]] = []
        limit = timeout if timeout is not None else self.settings.call_timeout_s
        for attempt in range(self.settings.call_retries + 1):
            if attempt:
                self._counts["failovers"] += 1
                pause = self.settings.retry_backoff_s * 2 ** (attempt - 1)
                await asyncio.sleep(self._rng() * pause)  # full jitter
            try:
                instance = self.pick(key, frozenset(tried))
            except NoInstance:
                if failures:
                    raise CallFailed(self.service, failures) from None
                raise
            member = self._members[instance.key]
            if not member.breaker.begin(self._clock()):
                continue
            tried.add(instance.key)
            self._counts["attempts"] += 1
            self._outstanding[instance.key] = self._outstanding.get(instance.key, 0) + 1
            try:
                async with asyncio.timeout(limit):
                    result = await fn(instance)
            except Exception as exc:
                if not retryable(exc):
                    member.breaker.success()  # it answered; the answer is the caller's
                    raise
                self._counts["failures"] += 1
                member.breaker.failure(self._clock())
                why = "timed out" if isinstance(exc, TimeoutError) else repr(exc)
                failures.append((instance.instance_id, why))
                continue
            finally:
                self._outstanding[instance.key] -= 1
            member.breaker.success()
            return result
        raise CallFailed(self.service, failures)
