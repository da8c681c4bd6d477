"""RPC housekeeping: the store-wide work on RPC requests that no single session owns.

Two chores, one job (`RpcHousekeeping`, named `rpc_housekeeping`):

- **Purge**: delete requests finished longer than `devices.rpc_retention_s` ago, every
  `devices.rpc_purge_interval_s` (at the next pass again while a batch comes back full).
- **Sweep** (only with an `RpcNotifier`, i.e. when several processes share the store):
  every `devices.rpc_sweep_interval_s`, end the open requests whose deadline passed
  (`rpc.deadline`: QUEUED → EXPIRED, SENT/DELIVERED → TIMEOUT) that no process
  holds. In one process every open request is held by its `RpcService`, whose deadline
  heap ends it; across processes a request handed off for a device that never comes
  back is held by nobody, and without the sweep would stay QUEUED for good.

Claims decide, as everywhere in RPC (`wakeups.py`): the sweep claims a due request
before ending it, so one held by a live process is left to it (it ends it by the same
deadline); a dead holder's claim lapses after `CLAIM_TTL_S` and the next pass takes the
request. The store ends only what is still open and due (`StateStore.expire_rpcs`, in
one transaction), then the claims are released, and a call
whose caller waits in some process is announced `finished` (as a holder announces it),
so that caller reads its outcome at once. A due request the sweep claimed but found
changed (rare: another process moved it just before) is released with a wake-up.

`iotmesh run` starts the job directly (no notifier: purge only, as before; the service
holds every request). `iotmesh serve` runs it in the `state` role as a singleton job
(`cluster/singleton.py`): one instance sweeps and purges at a time, and its writes carry
the term's fencing token — checked in the engine's fence before each pass and, in the
SQL state stores, in the transaction of each expiry and purge (`rpc_rows.RPC_FENCE`).

Error handling: a failed pass is logged and tried again at the next interval (nothing
is lost: the requests wait). A stale token (a newer leader) skips the pass the same way.
Resource handling: one task, started by `start` and cancelled by `stop`; claims taken
in a pass are released before it ends (or lapse if the process dies).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from iotmesh.commands.rpc import deadline
from iotmesh.commands.wakeups import RpcNotifier
from iotmesh.core.clock import now_ms
from iotmesh.core.errors import IotmeshError
from iotmesh.core.lifecycle import Service, cancel_task
from iotmesh.core.settings import DeviceSettings
from iotmesh.core.types import RpcRecord, RpcStatus

log = logging.getLogger(__name__)

JOB = "rpc_housekeeping"
PURGE_BATCH = 1000
SWEEP_BATCH = 500  # due requests read (and claimed) at a time

# Checks a fencing token before a pass: raises when a newer leader's token was seen.
FenceCheck = Callable[[int], Awaitable[None]]


class HousekeepingStore(Protocol):
    """What the job needs of the state store (see `StateStore` for the contract)."""

    async def due_rpcs(
        self, now: int, after: tuple[int, str, int] | None, limit: int
    ) -> list[RpcRecord]: ...

    async def expire_rpcs(
        self, keys: Sequence[tuple[str, int]], now: int, fencing_token: int | None = None
    ) -> list[RpcRecord]: ...

    async def purge_rpcs(
        self, finished_before: int, limit: int, fencing_token: int | None = None
    ) -> int: ...


class RpcHousekeeping(Service):
    """Purges finished RPC requests and, with a notifier, ends unheld overdue ones."""

    name = JOB
    stats_counters = frozenset({"passes", "purged", "expired", "timed_out", "left_held"})

    def __init__(
        self,
        store: HousekeepingStore,
        settings: DeviceSettings,
        *,
        notifier: RpcNotifier | None = None,
        fence: FenceCheck | None = None,
        clock: Callable[[], int] = now_ms,
    ) -> None:
        """`notifier`: claims and completions shared with the RPC services of other
        processes (its own member: this job's claims are not theirs); it is not
        started, as the job needs no wake-ups. `fence`: checked with the term's token
        before every pass (see `use_token`)."""
        self._store = store
        self._settings = settings
        self._notifier = notifier
        self._fence = fence
        self._clock = clock
        self._task: asyncio.Task[None] | None = None
        self._next_purge = 0
        self.fencing_token: int | None = None
        self.passes = 0
        self.purged = 0
        self.ended: collections.Counter[str] = collections.Counter()
        self.left_held = 0  # due requests skipped because a live process holds them

    def use_token(self, token: int) -> None:
        """This instance leads a new term: every write from now on carries `token`."""
        self.fencing_token = token

    async def start(self) -> None:
        self._next_purge = 0
        self._task = asyncio.create_task(self._run(), name=JOB)

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_task(task)

    async def _run(self) -> None:
        # Without a notifier a pass only checks whether the purge is due: a clock read.
        interval = self._settings.rpc_sweep_interval_s
        while True:
            try:
                await self.run_once()
            except Exception:
                log.exception("RPC housekeeping pass failed; trying again in %ss", interval)
            await asyncio.sleep(interval)

    async def run_once(self) -> None:
        """One pass now: the sweep (with a notifier), then the purge if it is due."""
        token = self.fencing_token
        if token is not None and self._fence is not None:
            await self._fence(token)
        if self._notifier is not None:
            await self.sweep()
        now = self._clock()
        if now >= self._next_purge and await self.purge() < PURGE_BATCH:
            self._next_purge = now + int(self._settings.rpc_purge_interval_s * 1000)
        self.passes += 1

    async def purge(self) -> int:
        """Delete a batch of requests finished longer than `rpc_retention_s` ago."""
        before = self._clock() - int(self._settings.rpc_retention_s * 1000)
        purged = await self._store.purge_rpcs(before, PURGE_BATCH, self.fencing_token)
        self.purged += purged
        return purged

    async def sweep(self) -> list[RpcRecord]:
        """End every overdue open request no process holds; return those ended."""
        assert self._notifier is not None, "the sweep needs claims (a notifier)"
        now = self._clock()
        ended: list[RpcRecord] = []
        after: tuple[int, str, int] | None = None
        while True:
            due = await self._store.due_rpcs(now, after, SWEEP_BATCH)
            by_device: dict[str, list[int]] = collections.defaultdict(list)
            for record in due:
                by_device[record.device_id].append(record.id)
            for device_id, ids in by_device.items():
                ended += await self._end(device_id, ids, now)
            if len(due) < SWEEP_BATCH:
                return ended
            last = due[-1]
            after = (deadline(last), last.device_id, last.id)

    async def _end(self, device_id: str, ids: list[int], now: int) -> list[RpcRecord]:
        """End the device's due requests this job can claim; release the claims."""
        notifier = self._notifier
        assert notifier is not None
        claimed = sorted(await notifier.claim(device_id, ids))
        self.left_held += len(ids) - len(claimed)
        if not claimed:
            return []
        try:
            keys = [(device_id, rpc_id) for rpc_id in claimed]
            ended = await self._store.expire_rpcs(keys, now, self.fencing_token)
        finally:
            await notifier.release(device_id, claimed)
        for record in ended:
            self.ended[record.status] += 1
        await self._announce(device_id, claimed, ended)
        return ended

    async def _announce(self, device_id: str, claimed: list[int], ended: list[RpcRecord]) -> None:
        """Tell waiting callers of ended calls; wake the device's sessions if a claimed
        request was not ended (a process may have skipped it while the claim was ours)."""
        notifier = self._notifier
        assert notifier is not None
        try:
            for record in ended:
                if not record.persistent:  # a call: its caller may wait in some process
                    await notifier.finished(device_id, record.id)
            if len(ended) < len(claimed):
                await notifier.wake(device_id)
        except IotmeshError as exc:  # the callers' own timeouts read the store
            log.warning("announcing swept RPC requests of %s failed: %s", device_id, exc)

    def stats(self) -> dict[str, Any]:
        return {
            "passes": self.passes,
            "purged": self.purged,
            "expired": self.ended[RpcStatus.EXPIRED],
            "timed_out": self.ended[RpcStatus.TIMEOUT],
            "left_held": self.left_held,
        }
