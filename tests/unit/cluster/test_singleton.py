"""Singleton: a service started only on the candidate that leads (in-memory leases).

The real engines, with `iotmesh serve` processes killed, are in
tests/integration/test_singletons.py.
"""

from __future__ import annotations

import asyncio
from typing import Any

from iotmesh.cluster.singleton import Singleton
from iotmesh.core.lifecycle import Health, Service
from tests.unit.cluster.test_election import MemoryLeases


class Job(Service):
    """Counts its starts and stops; remembers when it stopped (loop time)."""

    name = "retention"
    stats_counters = frozenset({"passes"})

    def __init__(self) -> None:
        self.running = False
        self.starts = 0
        self.stopped_at: list[float] = []

    async def start(self) -> None:
        self.running = True
        self.starts += 1

    async def stop(self) -> None:
        if self.running:
            self.stopped_at.append(asyncio.get_running_loop().time())
        self.running = False

    def health(self) -> Health:
        return Health(ok=True, detail="running")

    def stats(self) -> dict[str, Any]:
        return {"passes": self.starts}


async def until(predicate: Any, within: float = 5.0) -> None:
    async with asyncio.timeout(within):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def test_only_the_leader_runs_the_job_and_the_standby_takes_over() -> None:
    leases = MemoryLeases()
    jobs = [Job(), Job()]
    tokens: list[list[int]] = [[], []]
    a, b = (
        Singleton(leases, job, lease_s=0.3, owner=owner, on_elected=seen.append)
        for job, owner, seen in zip(jobs, ("a", "b"), tokens, strict=True)
    )
    async with a, b:
        await until(lambda: jobs[0].running)
        await asyncio.sleep(0.4)  # a few rounds: b stays standby
        assert a.is_leader
        assert not b.is_leader
        assert not jobs[1].running
        assert a.job == b.job == "retention"
        assert tokens == [[1], []]
        assert b.health() == Health(ok=True, detail="standby: another instance leads")
        assert a.health().detail == "running"
        assert a.stats() == {"passes": 1, "leader": True, "terms": 1}
        assert b.stats() == {"passes": 0, "leader": False, "terms": 0}
        assert a.stats_counters == {"passes", "terms"}

        await a.stop()  # releases the lease: b leads at its next round
        assert not jobs[0].running
        await until(lambda: jobs[1].running)
        assert tokens == [[1], [2]]  # the term's token came before the job started


async def test_a_leader_that_cannot_renew_stops_its_job_before_the_lease_ends() -> None:
    leases = MemoryLeases()
    job = Job()
    singleton = Singleton(leases, job, lease_s=0.6, owner="a")
    async with singleton:
        await until(lambda: job.running)
        _, _, expires = leases.held["retention"]
        leases.broken = True
        await until(lambda: not job.running)
        assert job.stopped_at[0] <= expires  # stopped before anyone else could lead
        assert not singleton.is_leader
        leases.broken = False
        await until(lambda: job.running)
        assert job.starts == 2
    assert not job.running


async def test_a_job_that_fails_to_start_is_stopped_and_the_lease_kept() -> None:
    class Broken(Job):
        async def start(self) -> None:
            await super().start()
            raise RuntimeError("store unreachable")

    leases = MemoryLeases()
    job = Broken()
    singleton = Singleton(leases, job, lease_s=0.3, owner="a")
    async with singleton:
        await until(lambda: job.starts == 1 and not job.running)
        assert singleton.is_leader  # another candidate would fail the same way
        health = singleton.health()
        assert not health.ok
        assert "store unreachable" in health.detail


async def test_companions_run_in_the_job_s_terms_only() -> None:
    leases = MemoryLeases()
    jobs, steps = [Job(), Job()], [Job(), Job()]
    a, b = (
        Singleton(leases, job, lease_s=0.3, owner=owner, companions=[step])
        for job, step, owner in zip(jobs, steps, ("a", "b"), strict=True)
    )
    async with a, b:
        await until(lambda: steps[0].running)
        assert jobs[0].running
        assert not steps[1].running
        await a.stop()  # the companion stops with the job; b's start together
        assert not steps[0].running
        assert not jobs[0].running
        await until(lambda: steps[1].running and jobs[1].running)
