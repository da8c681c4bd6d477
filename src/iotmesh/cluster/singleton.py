"""A service that runs on one instance of the cluster at a time: while that one leads.

`iotmesh serve` wraps each singleton job (retention and rollups) in a `Singleton`:
every instance of the role that hosts the job is a candidate of one `LeaderElection`
(lease `<job>`), and only the leader has the job's service started. `iotmesh run` does
not use this: one process, so the job is started directly and costs no engine round.

The job's service is started when this instance is elected (after `on_elected` has
been given the term's fencing token, so its first write already carries it) and stopped
when it steps down, which `LeaderElection` does before its lease can have expired (see
election.py): so an old leader's job has stopped before a new one's can start, unless
the old one was paused, which is what the fencing token is for.

Error handling: a job that fails to start is logged and the singleton reports itself
unhealthy (/healthz, /metrics) for the rest of the term; the instance keeps the lease
(the job is tried again at its next term, or on the next start of the process).
Resource handling: `start` makes the first election attempt (an unreachable engine
fails start-up); `stop` stops the job, then releases the lease so another candidate
takes over at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from iotmesh.cluster.election import LeaderElection, LeaseStore
from iotmesh.core.lifecycle import Health, Service

log = logging.getLogger(__name__)


class Singleton(Service):
    """`service` started only while this instance leads lease `service.name`.

    `name`, `stats` and the `/metrics` labels are those of the job (`stats` adds
    `leader`, 0 or 1, and `terms`, the number of terms this instance led), so its
    counters keep their names whether it runs under an election or not.
    """

    def __init__(
        self,
        leases: LeaseStore,
        service: Service,
        *,
        lease_s: float,
        owner: str | None = None,
        on_elected: Callable[[int], None] | None = None,
        companions: Sequence[Service] = (),
    ) -> None:
        self.name = service.name
        self.service = service
        # Run in the same terms as `service` (started after it, stopped before it): work
        # that must never run beside the job elsewhere, e.g. InfluxDB's rollup step,
        # which retention also runs before it deletes raw points.
        self.companions = tuple(companions)
        self._on_elected = on_elected
        self._failure: str | None = None  # why this term's job is not running
        self.election = LeaderElection(
            leases, service.name, lease_s=lease_s, owner=owner, job=self._lead
        )

    @property
    def job(self) -> str:
        """The job's name: its lease, and the `job` label of `iotmesh_leader`."""
        return self.election.lease

    @property
    def is_leader(self) -> bool:
        return self.election.is_leader

    @property
    def stats_counters(self) -> frozenset[str]:  # type: ignore[override]
        return self.service.stats_counters | {"terms"}

    @property
    def stats_labels(self) -> Mapping[str, str]:  # type: ignore[override]
        return self.service.stats_labels

    async def _lead(self, token: int) -> None:
        """The election's job for one term: run the service until cancelled."""
        if self._on_elected is not None:
            self._on_elected(token)
        self._failure = None
        started: list[Service] = []
        try:
            for service in (self.service, *self.companions):
                started.append(service)
                await service.start()
            await asyncio.Event().wait()  # until the term ends (the election cancels us)
        except Exception as exc:
            log.exception("%s: the job failed to start; it waits for the next term", self.name)
            self._failure = f"the job failed to start: {exc!r}"
        finally:
            for service in reversed(started):  # also after a start cut short by the term's end
                await service.stop()

    async def start(self) -> None:
        await self.election.start()

    async def stop(self) -> None:
        await self.election.stop()

    def health(self) -> Health:
        if not self.is_leader:
            return Health(ok=True, detail="standby: another instance leads")
        if self._failure is not None:
            return Health(ok=False, detail=self._failure)
        for companion in self.companions:
            if not (health := companion.health()).ok:
                return health
        return self.service.health()

    def stats(self) -> dict[str, Any]:
        election = self.election.stats()
        return {**self.service.stats(), "leader": self.is_leader, "terms": election["terms"]}
