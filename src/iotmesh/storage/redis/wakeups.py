"""RPC wake-ups and claims on Redis (`storage.redis.rpc_wakeups`): the
`commands.wakeups.RpcNotifier` of several processes.

- Wake-ups: `PUBLISH <ns>:rpc:wake <device id>`; completions: `PUBLISH <ns>:rpc:done
  <device id>/<request id>`. Every RPC service subscribes to both
  (`engines.redis.PubSubReader`: its own connection, re-subscribed with back-off when
  it drops, and then told "re-check everything", since pub/sub keeps nothing for the
  absent).
- Claims: a key `<ns>:rpc:claim:<device id>:<request id>` holding the claiming
  member, with expiry `claim_ttl_s` (the RPC service renews well within it); one
  script claims or renews a list of them (free or already ours → ours, extended),
  another releases ours.

Error handling: publish/claim/release/renew raise `HotStateError` (counted by
`HotState`); the subscription retries forever. Resource handling: `start` starts the
listener task, `stop` cancels it and closes its connection.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from typing import Any

from iotmesh.engines.redis import PubSubReader
from iotmesh.storage.redis.client import HotState

# As commands.wakeups (storage imports no service).
WakeHandler = Callable[[str | None], None]
FinishedHandler = Callable[[str, int], None]

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


class RedisRpcNotifier:
    """`RpcNotifier` on Redis pub/sub and claim keys; see the module docstring."""

    def __init__(self, hot: HotState, claim_ttl_s: float, member: str | None = None) -> None:
        self._hot = hot
        self.member = member or uuid.uuid4().hex
        self._channel = hot.key("rpc", "wake")
        self._done_channel = hot.key("rpc", "done")
        self._ttl_ms = int(claim_ttl_s * 1000)
        self._reader: PubSubReader | None = None
        self._scripts: dict[str, Any] = {}

    def _claim_key(self, device_id: str, rpc_id: int) -> str:
        return self._hot.key("rpc", "claim", device_id, str(rpc_id))

    def _script(self, source: str) -> Any:
        if source not in self._scripts:
            self._scripts[source] = self._hot.redis.register_script(source)
        return self._scripts[source]

    async def start(self, on_wake: WakeHandler, on_finished: FinishedHandler) -> None:
        async def on_message(channel: str, data: bytes) -> None:
            text = data.decode()
            if channel == self._channel:
                on_wake(text)
                return
            device_id, _, rpc_id = text.rpartition("/")
            if device_id and rpc_id.isdigit():
                on_finished(device_id, int(rpc_id))

        async def on_gap() -> None:
            on_wake(None)  # wake-ups sent while we were away are lost

        settings = self._hot.settings
        self._reader = PubSubReader(
            settings.url,
            [self._channel, self._done_channel],
            on_message,
            on_gap,
            lambda exc: self._hot.failed("rpc_subscribe", exc),
            connect_timeout_s=settings.timeout_s,
            name="rpc.wakeups",
        )
        await self._reader.start(settings.timeout_s)

    async def stop(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            await reader.stop()

    async def wake(self, device_id: str) -> None:
        await self._hot.call("rpc_wake", self._hot.redis.publish(self._channel, device_id))

    async def finished(self, device_id: str, rpc_id: int) -> None:
        done = self._hot.redis.publish(self._done_channel, f"{device_id}/{rpc_id}")
        await self._hot.call("rpc_done", done)

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
