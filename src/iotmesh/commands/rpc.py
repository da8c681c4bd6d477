"""Server-side RPC: a user asks a device to run a method; every request is stored.

A request is a row in the state store with a lifecycle (`RpcStatus`):

    QUEUED ──(handed to a session's sink)──▶ SENT ──(the sink returned)──▶ DELIVERED
      │                                       │  └─(sink: DeviceGone)─▶ QUEUED again
      │                                       └─(sink failed otherwise)─▶ FAILED
      └─(expiration_ts passed)─▶ EXPIRED         DELIVERED ──(reply)──▶ SUCCESSFUL
                                                 SENT/DELIVERED ──(timeout_ms)──▶ TIMEOUT
    one-way: SENT ──(the sink returned)──▶ SUCCESSFUL (delivered_ts = finished_ts)

A transport holding a live session that can receive RPC (an MQTT client subscribed to
`v1/devices/me/rpc/request/+`, a gateway subscribed to `v1/gateway/rpc`, a CoAP
observer of `.../rpc`, an HTTP long-poll) attaches an `RpcSink` for its device. Whenever
a sink is attached and the device has QUEUED requests, one dispatcher task per device
hands them to the newest sink, in id order. So a request made while the device is
offline goes out as soon as it has a session on any transport. What "the sink
returned" proves is the transport's to say (docs/device-api.md has the table).

Two kinds of request, as in ThingsBoard:
- `call`: the caller waits (up to `timeout_ms`, in all) for the reply. After a
  restart such a request is FAILED: nobody waits for it any more.
- `submit` (persistent): stored and returned at once; delivered whenever the device
  comes, also after a restart, until `expiration_ts`; then it waits `timeout_ms` for
  the reply. A request that was SENT when the platform stopped is QUEUED again (sent
  twice rather than never); a DELIVERED one keeps waiting for its reply.

Ids are integers, unique per device for good (the store counts them), as ThingsBoard
devices expect (`.../rpc/request/{id}`). Status changes are written behind, in
batches (`RpcJournal`); `flushed()` waits for them (the MQTT PUBACK of a reply does).

Several processes (an `RpcNotifier`, see `wakeups.py`): a request stored where the
device has no session is handed off — not held here, a wake-up published — and the
process holding the device's session loads it from the store (so does any process
where a session attaches). Each open request is held by the one process that claimed
it. A two-way `call` handed off is waited for here: the holder publishes `finished`
once the end is committed, and the caller reads the outcome (the reply) from the
store; when its time is up first, the store is read once more and, if no process holds
the request, it is ended here. A request nobody holds whose deadline passes (a device
that never came back) is ended by the housekeeping job's sweep (`rpc_housekeeping.py`),
which also purges old finished requests. Without a notifier (`iotmesh run`) none of
this happens across processes.

Error handling: no delivery or no reply in time → `DeviceTimeout` (HTTP 504) for a
waiting caller; a sink that fails with anything but `DeviceGone` → FAILED and
`DeviceGone` (502). Too many open requests for one device → `Overloaded` (503). A reply
to an unknown or finished id is ignored (and counted).
Resource handling: `start` loads open requests and starts the expiry task; `stop`
fails the requests callers wait for, stops dispatchers and writes every change.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from typing import Any

import msgspec

from iotmesh.commands.rpc_remote import OpenRequest as _Open
from iotmesh.commands.rpc_remote import RemoteCalls
from iotmesh.commands.rpc_store import MemoryRpcStore, RpcJournal, RpcStore
from iotmesh.commands.wakeups import RENEW_EVERY_S, RpcNotifier
from iotmesh.core.clock import now_ms
from iotmesh.core.errors import (
    DeviceGone,
    DeviceTimeout,
    IotmeshError,
    NotFound,
    Overloaded,
    PayloadError,
)
from iotmesh.core.lifecycle import Service
from iotmesh.core.settings import DeviceSettings
from iotmesh.core.types import Device, RpcPage, RpcRecord, RpcStatus

log = logging.getLogger(__name__)

MAX_TIMEOUT_MS = 10 * 60 * 1000
MAX_EXPIRATION_MS = 30 * 24 * 3600 * 1000
SINK_TIMEOUT_S = 120.0  # a sink that has not returned by then did not deliver
RETRY_S = 1.0  # after every attached sink refused a request, try again this much later
EXPIRY_INTERVAL_S = 0.2  # how often due deadlines are looked for (a heap peek)
LOAD_CONCURRENCY = 8  # store reads of devices' requests at once (several processes)

QUEUED, SENT, DELIVERED = RpcStatus.QUEUED, RpcStatus.SENT, RpcStatus.DELIVERED
OPEN = (QUEUED, SENT, DELIVERED)


def _gateway_key(gateway_id: str) -> str:
    return f"gateway:{gateway_id}"


class RpcRequest(msgspec.Struct, frozen=True):
    """One server-side RPC request as a device receives it."""

    id: int
    method: str
    params: Any
    oneway: bool = False


RpcSink = Callable[[Device, RpcRequest], Awaitable[None]]
"""A live session's way to send a request to a device (or to a device behind a
gateway). It returns once the transport delivered it and raises `DeviceGone` if the
session cannot take it (another session is then tried)."""


class _Queue:
    """The unfinished requests of one device, in id order, and its dispatcher."""

    __slots__ = ("device", "open", "task")

    def __init__(self, device: Device) -> None:
        self.device = device
        self.open: dict[int, _Open] = {}
        self.task: asyncio.Task[None] | None = None


def deadline(record: RpcRecord) -> int:
    """When an open request times out (SENT, DELIVERED) or expires (QUEUED). A call's
    `timeout_ms` is for everything (its expiration), wherever its caller waits. The
    state stores have it as SQL (`storage.rpc_rows.DEADLINE`) for the housekeeping sweep."""
    if record.status is QUEUED or record.sent_ts is None or not record.persistent:
        return record.expiration_ts
    return record.sent_ts + record.timeout_ms


class RpcService(Service):
    """Stores RPC requests, routes them to devices' live sessions, replies back."""

    name = "rpc"
    stats_counters = frozenset(
        {"stray_replies", *(f"finished_{s.lower()}" for s in RpcStatus if not s.open)}
    )

    def __init__(
        self,
        state: RpcStore | None = None,
        settings: DeviceSettings | None = None,
        *,
        clock: Callable[[], int] = now_ms,
        notifier: RpcNotifier | None = None,
    ) -> None:
        """`state`: where requests are kept (the state store); None keeps them in memory.
        `notifier`: wake-ups and claims shared with other processes (none: this process
        sees every session)."""
        self._store: RpcStore = state if state is not None else MemoryRpcStore()
        self._settings = settings if settings is not None else DeviceSettings()
        self._clock = clock
        self._journal = RpcJournal(self._store)
        self._sinks: dict[str, list[RpcSink]] = collections.defaultdict(list)
        self._queues: dict[str, _Queue] = {}
        self._deadlines: list[tuple[int, str, int]] = []  # heap; stale entries are skipped
        self._tasks: set[asyncio.Task[None]] = set()
        self._retries: dict[str, asyncio.TimerHandle] = {}
        self._expiry: asyncio.Task[None] | None = None
        self._notifier = notifier
        self._reloads: dict[str, bool] = {}  # device id → another pass asked for
        self._load_slots = asyncio.Semaphore(LOAD_CONCURRENCY)
        self._gateway_sinks = 0
        self._next_renew = 0.0
        self._stopping = False
        self.stray_replies = 0
        self.finished: collections.Counter[str] = collections.Counter()
        self._remote: RemoteCalls | None = None
        if notifier is not None:
            self._remote = RemoteCalls(
                self._store,
                self._journal,
                notifier,
                clock,
                self._still_open,
                self._spawn,
                self.finished,
            )

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the journal; load unfinished requests (see the module docstring)."""
        self._journal.start()
        if self._notifier is not None:
            # Other processes hold open requests; a device's are loaded (and claimed)
            # when its session attaches here.
            assert self._remote is not None
            self._stopping = self._remote.stopping = False
            await self._notifier.start(self._on_wake, self._remote.on_finished)
            self._expiry = asyncio.create_task(self._expiry_loop(), name="rpc.expiry")
            return
        devices: dict[str, Device | None] = {}
        now = self._clock()
        for record in await self._store.open_rpcs():
            if record.device_id not in devices:
                devices[record.device_id] = await self._store.get_device(record.device_id)
            device = devices[record.device_id]
            if device is None:
                continue
            if not record.persistent:
                error = "the platform restarted before the request finished"
                failed = msgspec.structs.replace(
                    record, status=RpcStatus.FAILED, finished_ts=now, error=error
                )
                self._journal.write(failed)
                continue
            if record.status is SENT:  # it may not have reached the device: send again
                record = msgspec.structs.replace(record, status=QUEUED, sent_ts=None)
                self._journal.write(record)
            self._add(device, _Open(record, None))
        self._expiry = asyncio.create_task(self._expiry_loop(), name="rpc.expiry")

    async def stop(self) -> None:
        self._stopping = True
        if self._remote is not None:
            self._remote.stopping = True
        if self._expiry is not None:
            self._expiry.cancel()
        for handle in self._retries.values():
            handle.cancel()
        self._retries.clear()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        held = [(q.device.id, e.record.id) for q in self._queues.values() for e in q.open.values()]
        for queue in list(self._queues.values()):
            for entry in list(queue.open.values()):
                if not entry.record.persistent:
                    error = "the platform is shutting down"
                    self._finish(entry, RpcStatus.FAILED, DeviceTimeout(error), error=error)
                elif entry.record.status is SENT:
                    self._set(entry, status=QUEUED, sent_ts=None)
        self._queues.clear()
        if self._remote is not None:  # their requests go on where they are held
            self._remote.fail_all(DeviceTimeout("the platform is shutting down"))
        if self._expiry is not None:
            await asyncio.gather(self._expiry, return_exceptions=True)
            self._expiry = None
        await self._journal.close()
        if self._notifier is not None and self._remote is not None:
            await self._remote.announce()
            await self._release(held, wake=True)
            await self._notifier.stop()

    def stats(self) -> dict[str, Any]:
        return {
            "open": sum(len(q.open) for q in self._queues.values()),
            "stray_replies": self.stray_replies,
            **{f"finished_{status.lower()}": n for status, n in self.finished.items()},
        }

    # -- sessions -------------------------------------------------------------------------

    def attach(self, device_id: str, sink: RpcSink) -> Callable[[], None]:
        """Register a session's sink (queued requests go out through it at once);
        returns the function that removes it."""
        detach = self._attach(device_id, sink)
        self._kick(device_id)
        if self._notifier is not None:
            self._reload_soon(device_id)
        return detach

    def attach_gateway(self, gateway_id: str, sink: RpcSink) -> Callable[[], None]:
        """Register a gateway session's sink for the devices behind the gateway."""
        detach = self._attach(_gateway_key(gateway_id), sink)
        for queue in list(self._queues.values()):
            if queue.device.gateway_id == gateway_id:
                self._kick(queue.device.id)
        return detach

    def _attach(self, key: str, sink: RpcSink) -> Callable[[], None]:
        self._sinks[key].append(sink)
        gateway = key.startswith("gateway:")
        self._gateway_sinks += gateway

        def detach() -> None:
            sinks = self._sinks.get(key)
            if sinks and sink in sinks:
                sinks.remove(sink)
                self._gateway_sinks -= gateway
                if not sinks:
                    del self._sinks[key]
                    if self._notifier is not None:
                        self._hand_back_soon(key)

        return detach

    def _sink_for(self, device: Device, tried: Iterable[RpcSink]) -> RpcSink | None:
        """The newest sink of the device (or of its gateway) not tried yet."""
        owners = [device.id]
        if device.gateway_id:
            owners.append(_gateway_key(device.gateway_id))
        for owner in owners:
            for sink in reversed(self._sinks.get(owner, ())):
                if sink not in tried:
                    return sink
        return None

    # -- requests -------------------------------------------------------------------------

    @staticmethod
    def _check(method: str, timeout_ms: int) -> None:
        if not method:
            raise PayloadError("method must not be empty")
        if not 0 < timeout_ms <= MAX_TIMEOUT_MS:
            raise PayloadError(f"timeout_ms must be between 1 and {MAX_TIMEOUT_MS}")

    async def call(
        self, device: Device, method: str, params: Any, *, timeout_ms: int, oneway: bool = False
    ) -> Any:
        """Send a request to `device` and wait for its reply (None when one-way: then
        for its delivery), `timeout_ms` in all.

        Raises:
            PayloadError: empty method or a timeout out of range.
            Overloaded: the device has `rpc_max_open` unfinished requests.
            DeviceTimeout: the device was not reachable or did not reply in time.
            DeviceGone: its session failed to take the request.
        """
        self._check(method, timeout_ms)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        now = self._clock()
        entry = await self._create(
            device, method, params, oneway, False, timeout_ms, now + timeout_ms, future
        )
        late = f"device {device.name} did not answer {method!r} within {timeout_ms} ms"
        remote = self._remote
        try:
            async with asyncio.timeout(timeout_ms / 1000):
                return await future
        except TimeoutError:
            if remote is not None and remote.waits_here(entry):
                return await remote.outcome(entry, late)
            status = RpcStatus.EXPIRED if entry.record.status is QUEUED else RpcStatus.TIMEOUT
            self._finish(entry, status, None)
            raise DeviceTimeout(late) from None
        finally:
            if remote is not None:
                remote.done_waiting(entry)
            if entry.record.status.open and self._still_open(entry):  # the caller went away
                self._finish(entry, RpcStatus.FAILED, None, error="the caller went away")

    async def submit(
        self,
        device: Device,
        method: str,
        params: Any,
        *,
        timeout_ms: int,
        oneway: bool = False,
        expiration_ts: int | None = None,
    ) -> RpcRecord:
        """Store a persistent request and return it (QUEUED) at once; it is delivered
        when the device has a session, until `expiration_ts` (Unix ms; default
        `rpc_default_expiration_s` from now).

        Raises:
            PayloadError: empty method, timeout or expiration out of range.
            Overloaded: the device has `rpc_max_open` unfinished requests.
        """
        self._check(method, timeout_ms)
        now = self._clock()
        if expiration_ts is None:
            expiration_ts = now + int(self._settings.rpc_default_expiration_s * 1000)
        if expiration_ts <= now:
            raise PayloadError("the expiration time has passed already")
        if expiration_ts - now > MAX_EXPIRATION_MS:
            raise PayloadError(f"a request may wait at most {MAX_EXPIRATION_MS} ms")
        entry = await self._create(device, method, params, oneway, True, timeout_ms, expiration_ts)
        return entry.record

    async def _create(
        self,
        device: Device,
        method: str,
        params: Any,
        oneway: bool,
        persistent: bool,
        timeout_ms: int,
        expiration_ts: int,
        future: asyncio.Future[Any] | None = None,
    ) -> _Open:
        queue = self._queues.get(device.id)
        limit = self._settings.rpc_max_open
        if queue is not None and len(queue.open) >= limit:
            raise Overloaded(f"device {device.name} has {limit} unfinished RPC requests", 5.0)
        draft = RpcRecord(
            device_id=device.id,
            id=0,
            method=method,
            params=params,
            oneway=oneway,
            persistent=persistent,
            status=QUEUED,
            timeout_ms=timeout_ms,
            created_ts=self._clock(),
            expiration_ts=expiration_ts,
        )
        entry = _Open(await self._store.create_rpc(draft), future)
        if self._notifier is not None and not await self._hold(device, entry):
            return entry
        self._add(device, entry)
        self._kick(device.id)
        return entry

    def reply(self, device_id: str, request_id: int, payload: Any) -> bool:
        """A device's reply: the request is SUCCESSFUL and its caller gets `payload`.
        False (and counted) when no two-way request of the device has this id open."""
        queue = self._queues.get(device_id)
        entry = queue.open.get(request_id) if queue is not None else None
        if entry is None or entry.record.oneway:
            self.stray_replies += 1
            log.info("reply of device %s to unknown RPC %s ignored", device_id, request_id)
            return False
        delivered = entry.record.delivered_ts or self._clock()
        self._finish(entry, RpcStatus.SUCCESSFUL, payload, response=payload, delivered_ts=delivered)
        return True

    async def flushed(self) -> None:
        """Return once every status change so far is committed."""
        await self._journal.flushed()

    # -- queries --------------------------------------------------------------------------

    async def get(self, device_id: str, rpc_id: int) -> RpcRecord:
        """One request of the device.

        Raises:
            NotFound: the device has no request with this id.
        """
        await self._journal.flushed()
        record = await self._store.get_rpc(device_id, rpc_id)
        if record is None:
            raise NotFound(f"device {device_id} has no RPC request {rpc_id}")
        return record

    async def list(
        self, device_id: str, page: int, page_size: int, statuses: list[RpcStatus] | None = None
    ) -> RpcPage:
        """A page (0-based) of the device's requests, newest first."""
        await self._journal.flushed()
        records, total = await self._store.list_rpcs(
            device_id, statuses, page * page_size, page_size
        )
        has_next = (page + 1) * page_size < total
        return RpcPage(records, total, page, page_size, has_next)

    async def delete(self, device_id: str, rpc_id: int) -> None:
        """Delete a request; an unfinished one is withdrawn (its caller gets DeviceGone).

        Raises:
            NotFound: the device has no request with this id.
        """
        queue = self._queues.get(device_id)
        entry = queue.open.pop(rpc_id, None) if queue is not None else None
        if entry is not None and entry.future is not None and not entry.future.done():
            entry.future.set_exception(DeviceGone("the RPC request was deleted"))
        self._journal.forget(device_id, rpc_id)
        if not await self._store.delete_rpc(device_id, rpc_id):
            raise NotFound(f"device {device_id} has no RPC request {rpc_id}")

    def forget(self, device_id: str) -> None:
        """The device was deleted (its stored requests with it): drop what is open."""
        queue = self._queues.pop(device_id, None)
        if queue is None:
            return
        for entry in queue.open.values():
            if entry.future is not None and not entry.future.done():
                entry.future.set_exception(DeviceGone("the device was deleted"))
        queue.open.clear()

    # -- state changes --------------------------------------------------------------------

    def _add(self, device: Device, entry: _Open) -> None:
        queue = self._queues.get(device.id)
        if queue is None:
            queue = self._queues[device.id] = _Queue(device)
        queue.device = device
        queue.open[entry.record.id] = entry
        self._push_deadline(entry.record)

    def _push_deadline(self, record: RpcRecord) -> None:
        heapq.heappush(self._deadlines, (deadline(record), record.device_id, record.id))
        if len(self._deadlines) > 1000 + 2 * sum(len(q.open) for q in self._queues.values()):
            # Finished requests leave their entries behind: rebuild from the open ones.
            self._deadlines = [
                (deadline(e.record), e.record.device_id, e.record.id)
                for q in self._queues.values()
                for e in q.open.values()
            ]
            heapq.heapify(self._deadlines)

    def _set(self, entry: _Open, **changes: Any) -> RpcRecord:
        record = entry.record = msgspec.structs.replace(entry.record, **changes)
        self._journal.write(record)
        if "status" in changes:
            self._push_deadline(record)
        return record

    def _finish(
        self, entry: _Open, status: RpcStatus, result: Any | BaseException, **changes: Any
    ) -> None:
        """End an open request; its caller (if any) gets `result` (raised if an error)."""
        if not entry.record.status.open:
            return
        record = self._set(entry, status=status, finished_ts=self._clock(), **changes)
        self.finished[status] += 1
        queue = self._queues.get(record.device_id)
        if queue is not None and queue.open.get(record.id) is entry:
            del queue.open[record.id]
            if not queue.open and queue.task is None:
                del self._queues[record.device_id]
        future = entry.future
        if future is None and not record.persistent and self._remote is not None:
            self._remote.ended(record)  # its caller waits in another process
        if future is None or future.done():
            return
        if status is RpcStatus.EXPIRED or status is RpcStatus.TIMEOUT:
            future.set_exception(DeviceTimeout(f"RPC request {record.id} ended {status}"))
        elif isinstance(result, BaseException):
            future.set_exception(result)
        elif status is RpcStatus.FAILED:
            future.set_exception(DeviceGone(record.error or "the request failed"))
        else:
            future.set_result(result)

    # -- delivery -------------------------------------------------------------------------

    def _kick(self, device_id: str) -> None:
        """Start the device's dispatcher if it has queued requests and a sink."""
        queue = self._queues.get(device_id)
        if queue is None or queue.task is not None:
            return
        if not any(e.record.status is QUEUED for e in queue.open.values()):
            return
        if self._sink_for(queue.device, ()) is None:
            return
        handle = self._retries.pop(device_id, None)
        if handle is not None:
            handle.cancel()
        task = asyncio.create_task(self._dispatch(queue), name=f"rpc.dispatch-{device_id}")
        queue.task = task
        self._tasks.add(task)
        task.add_done_callback(self._dispatched)

    def _dispatched(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("RPC dispatcher failed", exc_info=task.exception())

    async def _dispatch(self, queue: _Queue) -> None:
        """Hand the device's QUEUED requests to its sinks, oldest first."""
        try:
            while True:
                entry = next((e for e in queue.open.values() if e.record.status is QUEUED), None)
                if entry is None:
                    return
                if self._clock() >= entry.record.expiration_ts:
                    self._finish(entry, RpcStatus.EXPIRED, None)
                    continue
                if not await self._deliver(queue.device, entry):
                    if self._sink_for(queue.device, ()) is not None:
                        loop = asyncio.get_running_loop()
                        device_id = queue.device.id
                        self._retries[device_id] = loop.call_later(RETRY_S, self._kick, device_id)
                    return
        finally:
            queue.task = None
            if not queue.open and self._queues.get(queue.device.id) is queue:
                del self._queues[queue.device.id]
            elif self._notifier is not None and self._sink_for(queue.device, ()) is None:
                self._hand_back_soon(queue.device.id)

    def _still_open(self, entry: _Open) -> bool:
        queue = self._queues.get(entry.record.device_id)
        return queue is not None and queue.open.get(entry.record.id) is entry

    async def _deliver(self, device: Device, entry: _Open) -> bool:
        """Hand one request to the newest sink that takes it; False if none did."""
        tried: list[RpcSink] = []
        while (sink := self._sink_for(device, tried)) is not None:
            if not self._still_open(entry):
                return True  # finished or deleted while a sink was being tried
            tried.append(sink)
            record = self._set(entry, status=SENT, sent_ts=self._clock())
            request = RpcRequest(record.id, record.method, record.params, record.oneway)
            try:
                async with asyncio.timeout(SINK_TIMEOUT_S):
                    await sink(device, request)
            except (DeviceGone, TimeoutError) as exc:
                log.info("RPC %s of device %s not taken: %s", record.id, device.id, exc)
                if entry.record.status is SENT:
                    self._set(entry, status=QUEUED, sent_ts=None)
                continue
            except Exception as exc:
                log.exception("RPC %s of device %s: the session failed", record.id, device.id)
                error = f"the session failed: {exc or type(exc).__name__}"
                self._finish(entry, RpcStatus.FAILED, None, error=error)
                return True
            if entry.record.status is SENT:
                now = self._clock()
                if record.oneway:
                    self._finish(entry, RpcStatus.SUCCESSFUL, None, delivered_ts=now)
                else:
                    self._set(entry, status=DELIVERED, delivered_ts=now)
            return True
        return False

    # -- several processes (a notifier; see the module docstring) ------------------------

    async def _hold(self, device: Device, entry: _Open) -> bool:
        """Whether this process holds a new request (claimed), or handed it off: a
        persistent request for a device without a session here (then others are woken)."""
        assert self._notifier is not None
        record = entry.record
        here = self._sink_for(device, ()) is not None
        try:
            if not here:
                if entry.future is not None and self._remote is not None:
                    self._remote.wait_for(entry)
                await self._notifier.wake(device.id)
                return False
            await self._notifier.claim(device.id, [record.id])
        except IotmeshError as exc:
            # Stored either way: a session attaching anywhere loads it.
            log.warning("RPC %s of device %s: no wake-up/claim: %s", record.id, device.id, exc)
            return here
        return True

    def _on_wake(self, device_id: str | None) -> None:
        if self._stopping:
            return
        if device_id is None:  # messages may have been missed: re-check everything
            for key in list(self._sinks):
                if not key.startswith("gateway:"):
                    self._reload_soon(key)
            if self._remote is not None:
                self._remote.recheck()
        elif device_id in self._sinks or self._gateway_sinks:
            self._reload_soon(device_id)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._dispatched)

    def _reload_soon(self, device_id: str) -> None:
        """Load the device's open requests (once more if a load is under way)."""
        if self._stopping:
            return
        if device_id in self._reloads:
            self._reloads[device_id] = True
            return
        self._reloads[device_id] = False
        self._spawn(self._reload(device_id), f"rpc.reload-{device_id}")

    async def _reload(self, device_id: str) -> None:
        try:
            while True:
                try:
                    async with self._load_slots:
                        await self._load(device_id)
                except IotmeshError as exc:
                    log.warning("loading RPC requests of device %s failed: %s", device_id, exc)
                if not self._reloads.get(device_id):
                    return
                self._reloads[device_id] = False
        finally:
            self._reloads.pop(device_id, None)

    async def _load(self, device_id: str) -> None:
        """Take over the open requests of a device with a session here that no process
        holds (claims decide); a SENT one is QUEUED again, as after a restart."""
        assert self._notifier is not None
        device = await self._store.get_device(device_id)
        if device is None or self._sink_for(device, ()) is None:
            return
        await self._journal.flushed()  # what this process finished is not open any more
        records, _ = await self._store.list_rpcs(device_id, OPEN, 0, self._settings.rpc_max_open)
        queue = self._queues.get(device_id)
        new = [r for r in records if queue is None or r.id not in queue.open]
        if not new:
            return
        claimed = await self._notifier.claim(device_id, [r.id for r in new])
        now = self._clock()
        for record in sorted(new, key=lambda r: r.id):
            queue = self._queues.get(device_id)
            if record.id not in claimed or (queue is not None and record.id in queue.open):
                continue
            if not record.persistent and record.status is not QUEUED:
                # Sent by a process that is gone (its claim lapsed): the reply is lost.
                error = "the process that sent the request went away"
                failed = msgspec.structs.replace(
                    record, status=RpcStatus.FAILED, finished_ts=now, error=error
                )
                self._journal.write(failed)
                self.finished[RpcStatus.FAILED] += 1
                if self._remote is not None:
                    self._remote.ended(failed)
                continue
            if record.status is SENT:
                record = msgspec.structs.replace(record, status=QUEUED, sent_ts=None)
                self._journal.write(record)
            # A call handed off from here comes back to its waiting caller.
            adopted = self._remote.adopt(record) if self._remote is not None else None
            self._add(device, adopted or _Open(record, None))
        self._kick(device_id)

    def _hand_back_soon(self, key: str) -> None:
        if self._stopping:
            return
        if key.startswith("gateway:"):
            gateway_id = key.removeprefix("gateway:")
            ids = [q.device.id for q in self._queues.values() if q.device.gateway_id == gateway_id]
        else:
            ids = [key]
        for device_id in ids:
            self._spawn(self._hand_back(device_id), f"rpc.hand-back-{device_id}")

    async def _hand_back(self, device_id: str) -> None:
        """The device has no session here any more: its QUEUED persistent requests go
        back to the store (not held, claims released) and the other processes are woken."""
        queue = self._queues.get(device_id)
        if queue is None or queue.task is not None or self._sink_for(queue.device, ()) is not None:
            return
        given = [
            e for e in queue.open.values() if e.record.persistent and e.record.status is QUEUED
        ]
        if not given:
            return
        for entry in given:
            del queue.open[entry.record.id]
        if not queue.open and self._queues.get(device_id) is queue:
            del self._queues[device_id]
        await self._journal.flushed()
        await self._release([(device_id, e.record.id) for e in given], wake=True)

    async def _release(self, held: Sequence[tuple[str, int]], *, wake: bool) -> None:
        assert self._notifier is not None
        by_device: dict[str, list[int]] = collections.defaultdict(list)
        for device_id, rpc_id in held:
            by_device[device_id].append(rpc_id)
        try:
            for device_id, ids in by_device.items():
                await self._notifier.release(device_id, ids)
                if wake:
                    await self._notifier.wake(device_id)
        except IotmeshError as exc:
            log.warning("releasing RPC claims failed (they lapse by themselves): %s", exc)

    async def _renew_claims(self) -> None:
        assert self._notifier is not None
        now = time.monotonic()
        if now < self._next_renew:
            return
        self._next_renew = now + RENEW_EVERY_S
        held = [(q.device.id, rpc_id) for q in self._queues.values() for rpc_id in q.open]
        if held:
            await self._notifier.renew(held)

    # -- expiry ---------------------------------------------------------------------------

    def expire_due(self) -> int:
        """End every open request whose deadline passed (QUEUED → EXPIRED, SENT or
        DELIVERED → TIMEOUT); return how many. Pops only due heap entries."""
        now = self._clock()
        ended = 0
        while self._deadlines and self._deadlines[0][0] <= now:
            _, device_id, rpc_id = heapq.heappop(self._deadlines)
            queue = self._queues.get(device_id)
            entry = queue.open.get(rpc_id) if queue is not None else None
            if entry is None or deadline(entry.record) > now:
                continue  # finished, or its deadline moved (another heap entry has it)
            status = RpcStatus.EXPIRED if entry.record.status is QUEUED else RpcStatus.TIMEOUT
            self._finish(entry, status, None)
            ended += 1
        return ended

    async def _expiry_loop(self) -> None:
        while True:
            try:
                self.expire_due()
                if self._notifier is not None:
                    await self._renew_claims()
            except Exception:
                log.exception("RPC expiry pass failed")
            await asyncio.sleep(EXPIRY_INTERVAL_S)
