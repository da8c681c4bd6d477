"""Latest values in Redis (`storage.latest = "redis"`): one cache for many processes.

Layout: one hash `<ns>:latest:<device id>` per device; field = telemetry key, value =
`b"<ts>:" + msgpack(value)` (the timestamp as text first, so the Lua script compares
it without a msgpack decoder; msgpack keeps bool, long, double, string and JSON
values apart). The field "" (no telemetry key is empty) marks a hash that holds every
key of the device: it is set by `fill`, after a miss was read from the store. `get`
answers None without it.

Writes: one script call (`_UPSERT`) per committed batch, every device of the batch in
it: one round trip per batch, never per message. The script keeps a field only if its
timestamp is >= the stored one, so pipeline workers of several processes committing
out of order still leave the newest. Updates are written for every device, cached or
not: a `fill` racing with a commit (the store read before it, the update after) then
merges newest-wins instead of caching what the store had; and the hash is complete
only once filled. `storage.redis.latest_ttl_s` lets Redis drop quiet devices.

Error handling: this is a cache. A failed or slow (`timeout_s`) update is counted and
logged, never raised into the pipeline (ingest goes on); the devices it missed are
remembered (up to `MAX_LOST`, past that: all of this namespace) and their hashes
deleted with the next update that gets through, so no stale "complete" hash stays
(this process reads them from the store meanwhile). After a failed update, updates
skip Redis for a while (0.5 s, doubling to 10 s while it keeps failing; counted as
`latest_update_skipped`), so a Redis that hangs costs ingest one timeout now and
then, not one per batch. A failed `get` is a miss: the API reads the store.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable
from typing import Any

import msgspec

from iotmesh.core.types import TelemetryMessage, TsPoint
from iotmesh.storage.redis.client import HotState, HotStateError

log = logging.getLogger(__name__)

MAX_LOST = 10_000
PAUSE_MIN_S = 0.5
PAUSE_MAX_S = 10.0
_MARK = b""

# KEYS: one hash per device. ARGV[1]: TTL ms (0: none); ARGV[2]: "1" to mark the
# hashes complete (fill); then per key: a count n and n field/value pairs, or n = -1:
# delete the hash (an update this process could not write).
_UPSERT = """
local function ts(v) return tonumber(string.match(v, '^(-?%d+):')) end
local ttl = tonumber(ARGV[1])
local a = 3
for i = 1, #KEYS do
  local n = tonumber(ARGV[a]); a = a + 1
  if n < 0 then
    redis.call('DEL', KEYS[i])
  else
    for j = 1, n do
      local f, v = ARGV[a], ARGV[a + 1]; a = a + 2
      local old = redis.call('HGET', KEYS[i], f)
      if not old or ts(old) <= ts(v) then
        redis.call('HSET', KEYS[i], f, v)
      end
    end
    if ARGV[2] == '1' then redis.call('HSET', KEYS[i], '', '1') end
    if ttl > 0 and n > 0 then redis.call('PEXPIRE', KEYS[i], ttl) end
  end
end
return #KEYS
"""

_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder().decode


def encode_point(ts: int, value: Any) -> bytes:
    return b"%d:%b" % (ts, _encode(value))


def decode_point(data: bytes) -> TsPoint:
    ts, _, packed = data.partition(b":")
    return TsPoint(int(ts), _decode(packed))


class RedisLatestValues:
    """`pipeline.latest.LatestCache` on Redis; see the module docstring."""

    def __init__(self, hot: HotState) -> None:
        self._hot = hot
        self._ttl_ms = int(hot.settings.latest_ttl_s * 1000)
        self._lost: set[str] = set()
        self._lost_all = False
        self._pause = 0.0  # after a failed update, skip Redis for this long (doubling)
        self._paused_until = 0.0
        self._script: Any = None

    def _key(self, device_id: str) -> str:
        return self._hot.key("latest", device_id)

    def _upsert(self, keys: list[str], args: list[Any]) -> Any:
        if self._script is None:
            self._script = self._hot.redis.register_script(_UPSERT)
        return self._script(keys=keys, args=args)

    async def get(self, device_id: str) -> dict[str, TsPoint] | None:
        if self._lost_all or device_id in self._lost:
            return None  # this process knows Redis missed an update of it
        try:
            raw: dict[Any, Any] = await self._hot.call(
                "latest_get", self._hot.redis.hgetall(self._key(device_id))
            )
        except HotStateError:
            return None
        if _MARK not in raw:
            return None
        return {f.decode(): decode_point(v) for f, v in raw.items() if f != _MARK}

    async def fill(self, device_id: str, values: dict[str, TsPoint]) -> None:
        args: list[Any] = [self._ttl_ms, "1", len(values)]
        for key, point in values.items():
            args += (key, encode_point(point.ts, point.value))
        with contextlib.suppress(HotStateError):  # then the next read is a miss again
            await self._hot.call("latest_fill", self._upsert([self._key(device_id)], args))

    async def invalidate(self, device_id: str) -> None:
        try:
            await self._hot.call("latest_invalidate", self._hot.redis.delete(self._key(device_id)))
        except HotStateError:
            self._lose([device_id])

    async def update(self, messages: Iterable[TelemetryMessage]) -> None:
        if self._paused_until and time.monotonic() < self._paused_until:
            # Redis failed just now: do not make every batch wait for its timeout.
            self._hot.errors["latest_update_skipped"] += 1
            self._lose({m.device_id for m in messages})
            return
        newest: dict[str, dict[str, tuple[int, Any]]] = {}
        for message in messages:
            points = newest.setdefault(message.device_id, {})
            for record in message.records:
                ts = record.ts
                for key, value in record.values.items():
                    old = points.get(key)
                    if old is None or ts >= old[0]:
                        points[key] = (ts, value)
        if not newest:
            return
        try:
            if self._lost_all:
                await self._hot.call("latest_update", self._delete_all())
                self._lost_all = False
            lost, self._lost = self._lost, set()  # deleted first, then updated
            keys = [self._key(d) for d in lost]
            args: list[Any] = [self._ttl_ms, "0"]
            args += [-1] * len(lost)
            for device_id, newer in newest.items():
                keys.append(self._key(device_id))
                args.append(len(newer))
                for key, (ts, value) in newer.items():
                    args += (key, encode_point(ts, value))
            try:
                await self._hot.call("latest_update", self._upsert(keys, args))
            except HotStateError:
                self._lose(lost)
                raise
        except HotStateError:
            self._lose(newest)
            self._pause = min(self._pause * 2, PAUSE_MAX_S) if self._pause else PAUSE_MIN_S
            self._paused_until = time.monotonic() + self._pause
        else:
            self._pause = self._paused_until = 0.0

    def _lose(self, device_ids: Iterable[str]) -> None:
        """Remember devices whose hash may now be stale, to delete it when Redis is back."""
        if self._lost_all:
            return
        self._lost.update(device_ids)
        if len(self._lost) > MAX_LOST:
            self._lost_all = True
            self._lost.clear()

    async def _delete_all(self) -> None:
        r = self._hot.redis
        keys = [k async for k in r.scan_iter(match=self._key("*"), count=1000)]
        for i in range(0, len(keys), 500):
            await r.delete(*keys[i : i + 500])
