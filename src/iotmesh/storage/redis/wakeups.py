"""RPC wake-ups and claims on Redis (`storage.redis.rpc_wakeups`): the
`commands.wakeups.RpcNotifier` of several processes.

- Wake-ups: `PUBLISH <ns>:rpc:wake <device id>`; every RPC service subscribes (its
  own connection, no read timeout, re-subscribed with back-off when it drops, and then
  told "re-check everything", since pub/sub keeps nothing for the absent).
- Claims: a key `<ns>:rpc:claim:<device id>:<request id>` holding the claiming
  member, with expiry `claim_ttl_s` (the RPC service renews well within it); one
  script claims or renews a list of them (free or already ours → ours, extended),
  another releases ours.

Error handling: publish/claim/release/renew raise `HotStateError` (counted by
`HotState`); the subscription retries forever. Resource handling: `start` starts the
listener task, `stop` cancels it and closes its connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions

from iotmesh.storage.redis.client import HotState

WakeHandler = Callable[[str | None], None]  # as commands.wakeups (storage imports no service)

# KEYS: claim keys. ARGV: member, TTL ms. Free or ours → ours (extended). Returns the
# 1-based indexes of the keys now ours.
_CLAIM = """
local held = {}
for i, k in ipairs(KEYS) do
  local owner = redis.call('GET', k)
  if not owner then
    redis.call('SET', k, ARGV[1], 'PX', ARGV[2])
    owner = ARGV[1]
  elseif owner == ARGV[1] then
    redis.call('PEXPIRE', k, ARGV[2])
  end
  if owner == ARGV[1] then held[#held + 1] = i end
end
return held
"""

_RELEASE = """
for _, k in ipairs(KEYS) do
  if redis.call('GET', k) == ARGV[1] then redis.call('DEL', k) end
end
return 1
"""

_BATCH = 1000
_BACKOFF_MAX_S = 5.0


class RedisRpcNotifier:
    """`RpcNotifier` on Redis pub/sub and claim keys; see the module docstring."""

    def __init__(self, hot: HotState, claim_ttl_s: float, member: str | None = None) -> None:
        self._hot = hot
        self.member = member or uuid.uuid4().hex
        self._channel = hot.key("rpc", "wake")
        self._ttl_ms = int(claim_ttl_s * 1000)
        self._task: asyncio.Task[None] | None = None
        self._scripts: dict[str, Any] = {}
        self.subscribed = asyncio.Event()

    def _claim_key(self, device_id: str, rpc_id: int) -> str:
        return self._hot.key("rpc", "claim", device_id, str(rpc_id))

    def _script(self, source: str) -> Any:
        if source not in self._scripts:
            self._scripts[source] = self._hot.redis.register_script(source)
        return self._scripts[source]

    async def start(self, on_wake: WakeHandler) -> None:
        self._task = asyncio.create_task(self._listen(on_wake), name="rpc.wakeups")
        # A wake-up published right after start-up should not be missed: wait a little
        # for the subscription (not failing: it is retried in the background).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._hot.settings.timeout_s):
                await self.subscribed.wait()

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _listen(self, on_wake: WakeHandler) -> None:
        settings = self._hot.settings
        backoff = 0.1
        attempt = 0
        while True:
            attempt += 1
            client = aioredis.Redis.from_url(
                settings.url,
                socket_connect_timeout=settings.timeout_s,
                socket_timeout=None,  # a quiet channel is no error
                protocol=2,
            )
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._channel)
                self.subscribed.set()
                if attempt > 1:
                    on_wake(None)  # wake-ups sent while we were away are lost
                backoff = 0.1
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        data = message["data"]
                        on_wake(data.decode() if isinstance(data, bytes) else str(data))
            except (OSError, redis.exceptions.RedisError) as exc:
                self.subscribed.clear()
                self._hot.failed("rpc_subscribe", exc)
            finally:
                with contextlib.suppress(OSError, redis.exceptions.RedisError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
                    await client.aclose()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX_S)

    async def wake(self, device_id: str) -> None:
        await self._hot.call("rpc_wake", self._hot.redis.publish(self._channel, device_id))

    async def claim(self, device_id: str, rpc_ids: Sequence[int]) -> set[int]:
        held = await self._claim([(device_id, rpc_id) for rpc_id in rpc_ids])
        return {rpc_id for _, rpc_id in held}

    async def renew(self, held: Sequence[tuple[str, int]]) -> None:
        await self._claim(held)

    async def _claim(self, items: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
        ours: list[tuple[str, int]] = []
        for i in range(0, len(items), _BATCH):
            chunk = items[i : i + _BATCH]
            keys = [self._claim_key(d, r) for d, r in chunk]
            script = self._script(_CLAIM)
            indexes = await self._hot.call(
                "rpc_claim", script(keys=keys, args=[self.member, self._ttl_ms])
            )
            ours += (chunk[int(n) - 1] for n in indexes)
        return ours

    async def release(self, device_id: str, rpc_ids: Sequence[int]) -> None:
        keys = [self._claim_key(device_id, r) for r in rpc_ids]
        for i in range(0, len(keys), _BATCH):
            script = self._script(_RELEASE)
            await self._hot.call(
                "rpc_release", script(keys=keys[i : i + _BATCH], args=[self.member])
            )
