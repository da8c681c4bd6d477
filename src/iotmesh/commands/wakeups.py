"""The seam between RPC services of several processes: wake-ups and claims.

In one process (`iotmesh run`) an `RpcService` sees every session, so it needs no
notifier: it is built without one and behaves as it always did. When several
processes share one state store (an http process storing requests, transport
processes holding the devices' sessions), a request stored by one must reach the one
holding the session. `RpcNotifier` carries that:

- `wake(device_id)`: "the device has QUEUED requests in the store" — every process is
  told; the one with a session for the device (or its gateway) loads them.
- `finished(device_id, rpc_id)`: "this request is finished, and committed" — a caller
  waiting for it in another process (a two-way call made where the device has no
  session) reads its outcome from the store.
- `claim`/`release`/`renew`: an open request is held (dispatched, timed out, waited for)
  by one process at a time, the one that claimed it; a claim is a lease, renewed
  while held, so a dead process's requests can be taken over after `CLAIM_TTL_S`.

Implementations: `storage.redis.wakeups.RedisRpcNotifier` (Redis pub/sub and
`SET NX PX`; the hot state's Redis, or the bus's when the bus is Redis) and
`bus.nats_rpc.NatsRpcNotifier` (NATS core subjects and KV leases on the bus's NATS).
Wake-ups and completions are live messages, at most once: one that is lost costs a
delay (until the session attaches again, or the caller's timeout re-reads the store),
never a request. Delivery stays at least once: a claim lost to an outage may let a
second process send a request again, as a restart does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

CLAIM_TTL_S = 60.0  # a claim not renewed for this long is free again
RENEW_EVERY_S = 20.0

WakeHandler = Callable[[str | None], None]
"""Called with a device id on a wake-up; with None when wake-ups (or completions) may
have been missed (the subscription was re-established): re-check every device with a
session here, and every request waited for here."""

FinishedHandler = Callable[[str, int], None]
"""Called with (device id, request id) when some process finished a request."""


class RpcNotifier(Protocol):
    """Wake-ups and claims between the RPC services of several processes.

    Error handling: `wake`, `claim`, `release` and `renew` raise an `IotmeshError` when
    the messenger is unreachable; the RPC service logs it and carries on (a wake-up not
    sent is made up for when the device's session attaches again).
    """

    async def start(self, on_wake: WakeHandler, on_finished: FinishedHandler) -> None:
        """Subscribe; the handlers are called from the notifier's tasks until `stop`."""
        ...

    async def stop(self) -> None: ...

    async def wake(self, device_id: str) -> None:
        """Tell every process that `device_id` has QUEUED requests in the store."""
        ...

    async def finished(self, device_id: str, rpc_id: int) -> None:
        """Tell every process that a request is finished (its end is committed)."""
        ...

    async def claim(self, device_id: str, rpc_ids: Sequence[int]) -> set[int]:
        """Claim requests of a device for this process; returns those now held by it
        (free ones and those it held already)."""
        ...

    async def release(self, device_id: str, rpc_ids: Sequence[int]) -> None:
        """Give up claims of this process (others may take the requests at once)."""
        ...

    async def renew(self, held: Sequence[tuple[str, int]]) -> None:
        """Extend the claims this process holds (device id, request id)."""
        ...
