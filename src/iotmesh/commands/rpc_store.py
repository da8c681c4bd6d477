"""Where `RpcService` keeps its requests: the state store's part for RPC, and the
journal that writes status changes behind the service's back, in batches.

`RpcStore` is the slice of `storage.state.StateStore` the RPC service uses; the SQLite
state store is one. `MemoryRpcStore` keeps requests in this process only (for an
`RpcService()` built without a state store, e.g. in transport tests).

Error handling: a failed journal write is logged and retried (backing off up to 5 s)
with the newest state of each request; `flushed()` waits for it. Nothing is dropped.
Resource handling: `start` then `close`, which writes what is pending first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Protocol

import msgspec

from iotmesh.core.errors import IotmeshError, StorageError
from iotmesh.core.types import Device, RpcRecord, RpcStatus

log = logging.getLogger(__name__)

RETRY_MAX_S = 5.0


class RpcStore(Protocol):
    """What the RPC service needs of a store (see `StateStore` for the contract)."""

    async def get_device(self, device_id: str) -> Device | None: ...

    async def create_rpc(self, record: RpcRecord) -> RpcRecord: ...

    async def update_rpcs(self, records: Sequence[RpcRecord]) -> None: ...

    async def get_rpc(self, device_id: str, rpc_id: int) -> RpcRecord | None: ...

    async def list_rpcs(
        self, device_id: str, statuses: Sequence[RpcStatus] | None, offset: int, limit: int
    ) -> tuple[list[RpcRecord], int]: ...

    async def open_rpcs(self) -> list[RpcRecord]: ...

    async def delete_rpc(self, device_id: str, rpc_id: int) -> bool: ...


class MemoryRpcStore:
    """`RpcStore` in memory: requests live as long as the process. Any device exists."""

    def __init__(self) -> None:
        self._records: dict[str, dict[int, RpcRecord]] = {}
        self._last_id: dict[str, int] = {}

    async def get_device(self, device_id: str) -> Device | None:
        return None  # only asked at start-up, when nothing is open here

    async def create_rpc(self, record: RpcRecord) -> RpcRecord:
        rpc_id = self._last_id[record.device_id] = self._last_id.get(record.device_id, 0) + 1
        stored = msgspec.structs.replace(record, id=rpc_id)
        self._records.setdefault(record.device_id, {})[rpc_id] = stored
        return stored

    async def update_rpcs(self, records: Sequence[RpcRecord]) -> None:
        for record in records:
            by_id = self._records.get(record.device_id, {})
            if record.id in by_id:
                by_id[record.id] = record

    async def get_rpc(self, device_id: str, rpc_id: int) -> RpcRecord | None:
        return self._records.get(device_id, {}).get(rpc_id)

    async def list_rpcs(
        self, device_id: str, statuses: Sequence[RpcStatus] | None, offset: int, limit: int
    ) -> tuple[list[RpcRecord], int]:
        found = [
            r
            for r in sorted(self._records.get(device_id, {}).values(), key=lambda r: -r.id)
            if statuses is None or r.status in statuses
        ]
        return found[offset : offset + limit], len(found)

    async def open_rpcs(self) -> list[RpcRecord]:
        return []

    async def delete_rpc(self, device_id: str, rpc_id: int) -> bool:
        return self._records.get(device_id, {}).pop(rpc_id, None) is not None


class RpcJournal:
    """Writes request changes in batches: the newest state of each changed request, one
    transaction per batch, as fast as the store takes them (a request that goes
    SENT → DELIVERED → SUCCESSFUL within one commit is written once)."""

    def __init__(self, store: RpcStore) -> None:
        self._store = store
        self._pending: dict[tuple[str, int], RpcRecord] = {}
        self._queued = 0  # changes handed to `write`, ever
        self._written = 0  # of those, how many are committed
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="rpc.journal")

    def write(self, record: RpcRecord) -> None:
        """Queue the new state of a stored request."""
        self._pending[(record.device_id, record.id)] = record
        self._queued += 1
        self._wake.set()

    def forget(self, device_id: str, rpc_id: int) -> None:
        """Drop a pending change of a request that was deleted."""
        self._pending.pop((device_id, rpc_id), None)

    async def flushed(self) -> None:
        """Return once every change written before this call is committed."""
        if self._written >= self._queued:
            return
        future = asyncio.get_running_loop().create_future()
        self._waiters.append((self._queued, future))
        await future

    async def _run(self) -> None:
        backoff = 0.05
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._pending:
                continue
            batch, self._pending = self._pending, {}
            upto = self._queued
            try:
                await self._store.update_rpcs(list(batch.values()))
            except IotmeshError as exc:
                log.warning("writing %d RPC request changes failed: %s", len(batch), exc)
                self._pending = batch | self._pending  # newer changes win
                self._wake.set()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, RETRY_MAX_S)
                continue
            backoff = 0.05
            self._written = upto
            waiting, self._waiters = self._waiters, []
            for mark, future in waiting:
                if mark <= upto:
                    if not future.done():
                        future.set_result(None)
                else:
                    self._waiters.append((mark, future))

    async def close(self) -> None:
        """Write what is pending (bounded by the caller's shutdown timeout), then stop."""
        if self._task is None:
            return
        if not self._task.done():
            await self.flushed()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        for _, future in self._waiters:
            if not future.done():
                future.set_exception(StorageError("the RPC journal is closed"))
        self._waiters.clear()
