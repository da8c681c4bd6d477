"""RPC wake-ups and claims on the bus's NATS: the `commands.wakeups.RpcNotifier` of
processes joined by NATS JetStream, so they need no Redis for RPC across instances.

- Wake-ups and completions are broadcasts (`nats_broadcast.py`) on the core subjects
  `<ns>.live.rpc.wake` (data: the device id) and `<ns>.live.rpc.done` (data:
  `<device id>/<request id>`). A reconnect may have lost some: the handler is then
  told "re-check everything".
- Claims are leases (`engines.nats.KvLeases`, as the bus's partitions and the cluster's
  leaders) in the KV bucket `<ns>_rpc_claims`, whose TTL is `claim_ttl_s`: key
  `<device id>.<request id>`, value the claiming member. Claiming creates the entry,
  or rewrites it at the revision read if the value is ours already (compare-and-set),
  which also restarts its TTL; a release deletes it at the revision read if ours.

Error handling: every method raises `BusError` when NATS fails; the RPC service logs it
and carries on (claims lapse by themselves, a missed wake-up is made up for when the
device's session attaches again).
Resource handling: `start` subscribes, `stop` unsubscribes; the bucket is opened (made
if missing) on the first claim.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import nats.errors

from iotmesh.bus.interface import BusError, Subscription
from iotmesh.bus.nats import NatsBus
from iotmesh.bus.subjects import RPC_DONE as DONE
from iotmesh.bus.subjects import RPC_WAKE as WAKE
from iotmesh.engines.nats import KvLeases, open_bucket

# As commands.wakeups (the bus imports no service).
WakeHandler = Callable[[str | None], None]
FinishedHandler = Callable[[str, int], None]

T = TypeVar("T")


class NatsRpcNotifier:
    """`RpcNotifier` on NATS core subjects and a KV bucket; see the module docstring."""

    def __init__(self, bus: NatsBus, claim_ttl_s: float, member: str | None = None) -> None:
        self._bus = bus
        self._ttl_s = claim_ttl_s
        self.member = member or uuid.uuid4().hex
        self._leases: KvLeases | None = None
        self._subs: list[Subscription] = []

    async def start(self, on_wake: WakeHandler, on_finished: FinishedHandler) -> None:
        async def woken(data: bytes | None) -> None:
            on_wake(None if data is None else data.decode())

        async def done(data: bytes | None) -> None:
            if data is None:
                on_wake(None)  # what was missed: re-checked like missed wake-ups
                return
            device_id, _, rpc_id = data.decode().rpartition("/")
            if device_id and rpc_id.isdigit():
                on_finished(device_id, int(rpc_id))

        broadcast = self._bus.broadcast()
        self._subs = [
            await broadcast.subscribe(WAKE, woken),
            await broadcast.subscribe(DONE, done),
        ]

    async def stop(self) -> None:
        subs, self._subs = self._subs, []
        for sub in subs:
            await sub.close()

    async def wake(self, device_id: str) -> None:
        await self._bus.broadcast().publish(WAKE, device_id.encode())

    async def finished(self, device_id: str, rpc_id: int) -> None:
        await self._bus.broadcast().publish(DONE, f"{device_id}/{rpc_id}".encode())

    async def _kv(self) -> KvLeases:
        if self._leases is None:
            bucket = f"{self._bus.settings.namespace}_rpc_claims"
            kv = await self._call(open_bucket(self._bus.js, bucket, self._ttl_s))
            self._leases = KvLeases(kv)
        return self._leases

    @staticmethod
    async def _call(op: Awaitable[T]) -> T:
        try:
            return await op
        except (OSError, nats.errors.Error) as exc:
            raise BusError(f"NATS: RPC claims failed: {exc}") from exc

    @staticmethod
    def _key(device_id: str, rpc_id: int) -> str:
        return f"{device_id}.{rpc_id}"

    async def claim(self, device_id: str, rpc_ids: Sequence[int]) -> set[int]:
        held = await self._claim([(device_id, rpc_id) for rpc_id in rpc_ids])
        return {rpc_id for _, rpc_id in held}

    async def renew(self, held: Sequence[tuple[str, int]]) -> None:
        await self._claim(held)

    async def _claim(self, items: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
        leases = await self._kv()
        me = self.member.encode()
        ours = []
        for device_id, rpc_id in items:
            key = self._key(device_id, rpc_id)
            # Free → ours; ours already → rewritten (its TTL restarts); else another's.
            revision = await self._call(leases.acquire(key, me))
            if revision is None:
                revision = await self._call(leases.renew(key, me))
            if revision is not None:
                ours.append((device_id, rpc_id))
        return ours

    async def release(self, device_id: str, rpc_ids: Sequence[int]) -> None:
        leases = await self._kv()
        me = self.member.encode()
        for rpc_id in rpc_ids:
            await self._call(leases.release(self._key(device_id, rpc_id), me))
