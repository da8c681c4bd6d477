"""LeaderElection over an in-memory lease store whose clock is the event loop's.

The real engines are in tests/contract/test_cluster.py (leases) and
tests/integration/test_cluster.py (two candidate processes, one killed).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from iotmesh.cluster import LeaderElection, LeaseStore


class MemoryLeases(LeaseStore):
    def __init__(self) -> None:
        self.held: dict[str, tuple[str, int, float]] = {}
        self.counter = 0
        self.broken = False  # the engine unreachable

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def _live(self, name: str) -> tuple[str, int, float] | None:
        got = self.held.get(name)
        return got if got and got[2] > self._now() else None

    async def acquire(self, name: str, owner: str, ttl_s: float) -> int | None:
        if self.broken:
            raise ConnectionError("engine down")
        if self._live(name):
            return None
        self.counter += 1
        self.held[name] = (owner, self.counter, self._now() + ttl_s)
        return self.counter

    async def renew(self, name: str, owner: str, token: int, ttl_s: float) -> bool:
        if self.broken:
            raise ConnectionError("engine down")
        got = self._live(name)
        if got is None or got[:2] != (owner, token):
            return False
        self.held[name] = (owner, token, self._now() + ttl_s)
        return True

    async def release(self, name: str, owner: str, token: int) -> None:
        got = self._live(name)
        if got is not None and got[:2] == (owner, token):
            del self.held[name]

    async def holder(self, name: str) -> tuple[str, int] | None:
        got = self._live(name)
        return got[:2] if got else None


async def test_one_leads_and_the_other_takes_over_when_it_stops() -> None:
    leases = MemoryLeases()
    runs: list[tuple[str, int]] = []

    def job(who: str) -> Callable[[int], Coroutine[Any, Any, None]]:
        async def run(token: int) -> None:
            runs.append((who, token))
            await asyncio.Event().wait()

        return run

    a = LeaderElection(leases, "retention", lease_s=0.3, owner="a", job=job("a"))
    b = LeaderElection(leases, "retention", lease_s=0.3, owner="b", job=job("b"))
    async with a:
        assert await asyncio.wait_for(a.wait(), 5) == 1
        async with b:
            await asyncio.sleep(0.5)
            assert a.is_leader
            assert not b.is_leader
            await a.stop()  # releases: b takes over at its next round
            token = await asyncio.wait_for(b.wait(), 5)
            assert token == 2
    await asyncio.sleep(0)
    assert runs == [("a", 1), ("b", 2)]


async def test_a_leader_that_cannot_renew_steps_down_before_its_lease_ends() -> None:
    leases = MemoryLeases()
    stopped = asyncio.Event()
    lost: list[float] = []

    async def job(token: int) -> None:
        try:
            await asyncio.Event().wait()
        finally:
            stopped.set()

    async def revoked() -> None:
        lost.append(asyncio.get_running_loop().time())

    e = LeaderElection(leases, "rollups", lease_s=0.6, job=job, on_revoked=revoked)
    async with e:
        await asyncio.wait_for(e.wait(), 5)
        _, _, expires = leases.held["rollups"]
        leases.broken = True
        await asyncio.wait_for(stopped.wait(), 5)
        assert not e.is_leader
        assert lost
        assert lost[0] <= expires  # the job stopped before anyone else could lead
        leases.broken = False
        assert await asyncio.wait_for(e.wait(), 5) == 2  # a new term, a new token


async def test_a_lost_lease_is_noticed_at_the_next_renewal() -> None:
    leases = MemoryLeases()
    e = LeaderElection(leases, "rpc-expiry", lease_s=0.3, owner="a")
    async with e:
        await asyncio.wait_for(e.wait(), 5)
        leases.held["rpc-expiry"] = ("intruder", 99, leases._now() + 100)
        await asyncio.wait_for(e.wait(leader=False), 5)
        assert e.token is None


@pytest.mark.parametrize("name", ["bad name", "a.b", ""])
def test_names_are_checked(name: str) -> None:
    with pytest.raises(ValueError, match="letters"):
        LeaderElection(MemoryLeases(), name, lease_s=1)
