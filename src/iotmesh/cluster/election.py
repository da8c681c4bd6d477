"""Leader election for singleton jobs, on the engine's leases, with fencing tokens.

Not a consensus protocol of our own: the engine decides who holds the lease.

- Redis: `SET <lease> <owner>#<token> NX PX lease` in a script that draws the token
  from `INCR <fence counter>` in the same step; renewal is compare-and-PEXPIRE,
  release compare-and-DEL (`engines/redis.py`). Tokens grow as long as Redis keeps
  the counter (persistence on: AOF; a Redis that loses its data restarts the count).
- NATS KV: `create` of the lease entry (fails while it exists), renewal `update` with
  the revision last read; the bucket's TTL is the lease. The token is the revision at
  which the entry was created, and revisions grow across the bucket.
- Kubernetes: a Lease object, created or (when released or expired) replaced at the
  resourceVersion read; renewal replaces it likewise. The token is an annotation, + 1
  per term, kept across releases (`k8s_backend.py`). Expiry is judged by the
  readers' clocks from renewTime, so this one assumes clocks in step (NTP).

A candidate tries to take the lease every `lease_s / 3`; the leader renews it as
often. Leadership is only believed while it is sure: from the moment before the
request that took or renewed the lease, plus `lease_s`, minus one renewal period of
margin. A leader that cannot renew by then steps down (its job is cancelled) before
the engine can give the lease to someone else. So after a leader dies, another takes
over within `lease_s + lease_s / 3` (+ one request), and writes of the dead leader's
job carry an older token than the new leader's, which `fencing.Fence` refuses.

Error handling: an engine error in a round is logged; the leader keeps leading while
its lease is surely valid, then steps down; candidates retry next round.

Resource handling: one task for the election loop, one for the job while leading;
`stop` cancels the job, then releases the lease so another candidate takes over at
once rather than after the TTL.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from iotmesh.cluster.model import check_name
from iotmesh.core.lifecycle import Health, Service

log = logging.getLogger(__name__)

Job = Callable[[int], Coroutine[Any, Any, None]]


class LeaseStore(abc.ABC):
    """Leases with fencing tokens, as the engine provides them."""

    @abc.abstractmethod
    async def acquire(self, name: str, owner: str, ttl_s: float) -> int | None:
        """Take lease `name` if free; its fencing token, else None."""

    @abc.abstractmethod
    async def renew(self, name: str, owner: str, token: int, ttl_s: float) -> bool:
        """Extend a lease held as (owner, token); False if it was lost."""

    @abc.abstractmethod
    async def release(self, name: str, owner: str, token: int) -> None:
        """Give the lease up if still held as (owner, token)."""

    @abc.abstractmethod
    async def holder(self, name: str) -> tuple[str, int] | None:
        """(owner, token) holding lease `name` now, or None."""


class LeaderElection(Service):
    """One candidate for lease `name`; runs `job(token)` while it leads."""

    def __init__(
        self,
        leases: LeaseStore,
        name: str,
        *,
        lease_s: float,
        job: Job | None = None,
        owner: str | None = None,
        on_elected: Callable[[int], Awaitable[None]] | None = None,
        on_revoked: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.name = f"election.{check_name('election', name)}"
        self.lease = name
        self.owner = check_name("owner", owner or uuid.uuid4().hex[:12])
        self._leases = leases
        self._lease_s = lease_s
        self._tick = lease_s / 3
        self._job = job
        self._on_elected = on_elected
        self._on_revoked = on_revoked
        self._token: int | None = None
        self._sure_until = 0.0
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self._job_task: asyncio.Task[None] | None = None
        self._terms = 0

    @property
    def is_leader(self) -> bool:
        return self._token is not None

    @property
    def token(self) -> int | None:
        """Fencing token of the current term; None when not leading."""
        return self._token

    async def wait(self, leader: bool = True) -> int | None:
        """Return once this candidate leads (or, with False, does not); the token."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.is_leader == leader)
            return self._token

    async def start(self) -> None:
        """Make the first attempt, then keep trying in the background.

        Raises:
            ClusterError: the first attempt failed (engine unreachable, or its lease
                store refuses these settings): better at start-up than never leading.
        """
        loop = asyncio.get_running_loop()
        asked = loop.time()
        await self._round(asked)
        self._task = asyncio.create_task(self._run(asked + self._tick), name=self.name)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        token = self._token
        await self._step_down("stopping")
        if token is not None:
            try:
                await self._leases.release(self.lease, self.owner, token)
            except Exception:
                log.warning("%s: release failed; the lease expires", self.name, exc_info=True)

    def health(self) -> Health:
        return Health(ok=True, detail="leader" if self.is_leader else "follower")

    def stats(self) -> dict[str, int | bool | None]:
        return {"leader": self.is_leader, "token": self._token, "terms": self._terms}

    async def _run(self, first: float) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(max(0.0, first - loop.time()))
        while True:
            asked = loop.time()
            try:
                await self._round(asked)
            except Exception:
                log.warning("%s: lease round failed", self.name, exc_info=True)
            if self._token is not None and loop.time() >= self._sure_until:
                await self._step_down("lease not renewed in time")
            # Sleep to the next round, but wake to step down when the lease runs out.
            wake = asked + self._tick
            if self._token is not None:
                wake = min(wake, self._sure_until)
            await asyncio.sleep(max(0.0, wake - loop.time()))

    async def _round(self, asked: float) -> None:
        if self._token is not None:
            if await self._leases.renew(self.lease, self.owner, self._token, self._lease_s):
                self._sure_until = asked + self._lease_s - self._tick
            else:
                await self._step_down("lease lost")
            return
        token = await self._leases.acquire(self.lease, self.owner, self._lease_s)
        if token is not None:
            self._sure_until = asked + self._lease_s - self._tick
            await self._elected(token)

    async def _elected(self, token: int) -> None:
        self._terms += 1
        log.info("%s: %s leads with token %d", self.name, self.owner, token)
        async with self._changed:
            self._token = token
            self._changed.notify_all()
        if self._on_elected is not None:
            await self._on_elected(token)
        if self._job is not None:
            self._job_task = asyncio.create_task(self._job(token), name=f"{self.name}.job")

    async def _step_down(self, why: str) -> None:
        if self._token is None:
            return
        log.warning("%s: %s steps down: %s", self.name, self.owner, why)
        async with self._changed:
            self._token = None
            self._changed.notify_all()
        job, self._job_task = self._job_task, None
        if job is not None:
            job.cancel()
            try:
                await job
            except asyncio.CancelledError:
                pass
            except Exception:
                log.exception("%s: the job failed", self.name)
        if self._on_revoked is not None:
            await self._on_revoked()
