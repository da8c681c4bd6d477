"""Two-way RPC calls across processes: the caller waits in one, the device's session
(and the claim on the request) is in another.

`RpcService.call` made where the device has no session hands the request off (stored,
a wake-up published) and waits here: `RemoteCalls.wait_for`. The process that holds
the request ends it (a reply, a failure, its deadline), and once that end is committed
publishes `finished` (`ended`; `RpcNotifier.finished`). Here `on_finished` reads the
outcome from the store and hands it to the caller. A completion may be lost (live,
at most once): when the caller's time is up, `outcome` reads the store once more and,
if no process holds the request, ends it here (EXPIRED or TIMEOUT), so nothing is left
open that nobody will end. A holder ends a call by the same deadline (a call's
`timeout_ms` is for everything: `rpc.deadline`).

Error handling: a store or notifier that fails is logged; the caller then gets
`DeviceTimeout` when its time is up (the request goes on where it is held).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable, Coroutine
from typing import Any

import msgspec

from iotmesh.commands.rpc_store import RpcJournal, RpcStore
from iotmesh.commands.wakeups import RpcNotifier
from iotmesh.core.errors import DeviceGone, DeviceTimeout, IotmeshError
from iotmesh.core.types import RpcRecord, RpcStatus

log = logging.getLogger(__name__)


class OpenRequest:
    """An unfinished request: its newest state, and the caller waiting for it (if any)."""

    __slots__ = ("future", "record")

    def __init__(self, record: RpcRecord, future: asyncio.Future[Any] | None) -> None:
        self.record = record
        self.future = future


def outcome(record: RpcRecord) -> Any:
    """What the caller of a finished request gets: the reply, or the error raised."""
    if record.status is RpcStatus.EXPIRED or record.status is RpcStatus.TIMEOUT:
        raise DeviceTimeout(f"RPC request {record.id} ended {record.status}")
    if record.status is RpcStatus.FAILED:
        raise DeviceGone(record.error or "the request failed")
    return record.response


Spawn = Callable[[Coroutine[Any, Any, None], str], None]


class RemoteCalls:
    """Calls waited for here but held elsewhere, and calls ended here that callers
    elsewhere wait for; see the module docstring.

    Args:
        held: whether this process holds an entry (then its end reaches the caller
            directly, and nothing here applies).
        spawn: starts a named task the service owns (cancelled when it stops).
        finished: the service's counter of ended requests, by status.
    """

    def __init__(
        self,
        store: RpcStore,
        journal: RpcJournal,
        notifier: RpcNotifier,
        clock: Callable[[], int],
        held: Callable[[OpenRequest], bool],
        spawn: Spawn,
        finished: collections.Counter[str],
    ) -> None:
        self._store = store
        self._journal = journal
        self._notifier = notifier
        self._clock = clock
        self._held = held
        self._spawn = spawn
        self._finished = finished
        self.waiting: dict[tuple[str, int], OpenRequest] = {}
        self._ended: list[tuple[str, int]] = []
        self._announcing = False
        self.stopping = False

    # -- the caller's side --------------------------------------------------------------

    def wait_for(self, entry: OpenRequest) -> None:
        """The call is handed off; its caller waits here (register before the wake-up:
        its end may come at once)."""
        self.waiting[(entry.record.device_id, entry.record.id)] = entry

    def waits_here(self, entry: OpenRequest) -> bool:
        """Whether the entry is a call handed off and not (any more) held here."""
        key = (entry.record.device_id, entry.record.id)
        return self.waiting.get(key) is entry and not self._held(entry)

    def done_waiting(self, entry: OpenRequest) -> None:
        key = (entry.record.device_id, entry.record.id)
        if self.waiting.get(key) is entry:
            del self.waiting[key]

    def adopt(self, record: RpcRecord) -> OpenRequest | None:
        """The entry a caller here waits for, when this process loads the request itself
        (the device's session came here): it is then held here like any call."""
        entry = self.waiting.get((record.device_id, record.id))
        if entry is not None:
            entry.record = record
        return entry

    def on_finished(self, device_id: str, rpc_id: int) -> None:
        entry = self.waiting.get((device_id, rpc_id))
        if entry is None or self.stopping or self._held(entry):
            return
        self._spawn(self._settle(entry), f"rpc.settle-{device_id}-{rpc_id}")

    def recheck(self) -> None:
        """Completions may have been missed: read every waited-for call again."""
        for device_id, rpc_id in list(self.waiting):
            self.on_finished(device_id, rpc_id)

    def fail_all(self, error: BaseException) -> None:
        """This process stops: its callers get `error` (the requests go on elsewhere)."""
        for entry in self.waiting.values():
            if entry.future is not None and not entry.future.done():
                entry.future.set_exception(error)

    async def _settle(self, entry: OpenRequest) -> None:
        """A call waited for here ended elsewhere: its caller gets what the store says."""
        try:
            record = await self._store.get_rpc(entry.record.device_id, entry.record.id)
        except IotmeshError as exc:
            log.warning("reading RPC %s failed: %s", entry.record.id, exc)
            return  # the caller's timeout reads it again
        future = entry.future
        if future is None or future.done() or self._held(entry):
            return
        if record is None:
            future.set_exception(DeviceGone("the RPC request was deleted"))
        elif not record.status.open:
            entry.record = record
            try:
                future.set_result(outcome(record))
            except IotmeshError as exc:
                future.set_exception(exc)

    async def outcome(self, entry: OpenRequest, late: str) -> Any:
        """The caller's time is up: the store's outcome if it has one; else the request
        is ended here, unless a process holds it (which ends it by the same deadline).

        Raises:
            DeviceTimeout: it did not end in time (or ended so); `late` is the message.
            DeviceGone: it failed.
        """
        device_id, rpc_id = entry.record.device_id, entry.record.id
        record: RpcRecord | None = None
        try:
            record = await self._store.get_rpc(device_id, rpc_id)
            if record is not None and record.status.open:
                record = await self._end_unheld(device_id, rpc_id)
        except IotmeshError as exc:
            log.warning("RPC %s of device %s: no outcome read: %s", rpc_id, device_id, exc)
        if record is None or record.status.open:
            raise DeviceTimeout(late)
        if record.status is RpcStatus.EXPIRED or record.status is RpcStatus.TIMEOUT:
            raise DeviceTimeout(late)
        return outcome(record)

    async def _end_unheld(self, device_id: str, rpc_id: int) -> RpcRecord | None:
        """End an open request (EXPIRED or TIMEOUT) unless a process holds it; the
        request as stored afterwards."""
        if rpc_id not in await self._notifier.claim(device_id, [rpc_id]):
            return await self._store.get_rpc(device_id, rpc_id)
        try:
            record = await self._store.get_rpc(device_id, rpc_id)  # again, under the claim
            if record is not None and record.status.open:
                queued = record.status is RpcStatus.QUEUED
                status = RpcStatus.EXPIRED if queued else RpcStatus.TIMEOUT
                record = msgspec.structs.replace(record, status=status, finished_ts=self._clock())
                self._journal.write(record)
                self._finished[status] += 1
                await self._journal.flushed()
            return record
        finally:
            await self._notifier.release(device_id, [rpc_id])

    # -- the holder's side ----------------------------------------------------------------

    def ended(self, record: RpcRecord) -> None:
        """A call held here for a caller elsewhere ended: announce it once committed."""
        self._ended.append((record.device_id, record.id))
        if not self._announcing and not self.stopping:
            self._announcing = True
            self._spawn(self.announce(), "rpc.announce")

    async def announce(self) -> None:
        """Publish `finished` for the calls ended here, once their ends are committed
        (so the callers read them). The service calls it once more when it stops."""
        try:
            while self._ended:
                await self._journal.flushed()
                ended, self._ended = self._ended, []
                for device_id, rpc_id in ended:
                    await self._notifier.finished(device_id, rpc_id)
        except IotmeshError as exc:
            log.warning("announcing finished RPC requests failed: %s", exc)
        finally:
            self._announcing = False
