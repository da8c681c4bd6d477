"""The bus on Redis Streams (redis-py asyncio, consumer groups).

Layout in Redis, `ns` being `bus.namespace`:

- one stream `<ns>:<space>:p<n>` per subject space and partition; an entry holds the
  subject `s`, key `k`, message id `i` and data `d`. `publish` runs one Lua script that
  drops a duplicate (`SET <ns>:dedup:<msg id> NX PX dedup_window`), refuses when the
  stream already holds `partition_queue` entries (the caller retries until its timeout,
  then `Overloaded`) and XADDs; it returns once Redis has the entry (durability is then
  Redis's: AOF with `appendfsync always` for acknowledged = on disk).
- No `XADD MAXLEN`: trimming by length would drop entries some group has not acked yet.
  Instead, after each acked batch, a script trims the stream below the oldest entry any
  group still needs (its oldest pending entry, or its last delivered one), so a stream
  holds only what is not consumed by every group, and publishers are pushed back when
  that reaches `partition_queue`.
- per group (and pattern) one Redis consumer group `<group>-<hash>` on each partition
  stream, created at id 0 (a new group reads what is stored). The group reads entries
  of other subjects of the space too and acks them unseen (Redis cannot filter).
- the lease holder of a partition (`SET <ns>:lease:... NX PX ack_wait`) first claims
  every pending entry of the group (XAUTOCLAIM, idle 0: no one else may read it) and
  reads its own pending list (`XREADGROUP ... 0`, which counts a delivery) before new
  entries (`>`); the delivery count comes from XPENDING.
- member heartbeats in a sorted set `<ns>:members:<group id>` scored by expiry time.
- dead letters in the streams of the `dead_letter_subject` space, trimmed by age
  (`XADD MINID`) to `dead_letter_max_age_s`.
- live broadcasts (`broadcast()`) on pub/sub channels `<ns>:live:<topic>`
  (`redis_broadcast.py`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions

from iotmesh.bus import subjects
from iotmesh.bus.durable import (
    DurableGroup,
    Engine,
    EngineMessage,
    Source,
    check_name,
    dead_letter_subject,
    split_pattern,
)
from iotmesh.bus.interface import BatchHandler, Bus, BusError, Subscription
from iotmesh.bus.redis_broadcast import RedisBroadcast
from iotmesh.core.errors import Overloaded
from iotmesh.core.settings import BusSettings
from iotmesh.engines.redis import RedisLeases

POOL_SIZE = 128  # connections to Redis per bus (blocking reads of held partitions count)

# KEYS: stream, dedup key. ARGV: cap (0: none), dedup ms, minid (or ""), field/value...
# The dedup key is written last: a script that fails half-way leaves no key that
# would make the retry look like a duplicate.
_PUBLISH = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
if ARGV[1] ~= '0' and redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then return -1 end
if ARGV[3] ~= '' then
  redis.call('XADD', KEYS[1], 'MINID', '~', ARGV[3], '*', unpack(ARGV, 4))
else
  redis.call('XADD', KEYS[1], '*', unpack(ARGV, 4))
end
redis.call('SET', KEYS[2], '1', 'PX', ARGV[2])
return 1
"""

# KEYS: stream. Trim below the oldest entry a group still needs.
_TRIM = """
local function before(a, b)
  local am, as = string.match(a, '(%d+)-(%d+)')
  local bm, bs = string.match(b, '(%d+)-(%d+)')
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am < bm or (am == bm and as < bs)
end
local floor = nil
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local f = {}
  for i = 1, #g, 2 do f[g[i]] = g[i + 1] end
  local need = f['last-delivered-id']
  if f['pending'] > 0 then need = redis.call('XPENDING', KEYS[1], f['name'])[2] end
  if floor == nil or before(need, floor) then floor = need end
end
if floor == nil then return 0 end
return redis.call('XTRIM', KEYS[1], 'MINID', floor)
"""

# KEYS: stream. ARGV: group, consumer. Every pending entry of the group to the consumer;
# JUSTID, so the delivery count is not raised (reading it does that).
_CLAIM_ALL = """
local cursor = '0-0'
repeat
  local r = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, cursor, 'COUNT', 1000, 'JUSTID')
  cursor = r[1]
until cursor == '0-0'
return 1
"""

_HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return redis.call('ZCARD', KEYS[1])
"""


class _RedisSource(Source):
    """One partition stream read by the lease holder, as Redis consumer `member`."""

    def __init__(self, bus: RedisBus, stream: str, group: str, pattern: str, member: str) -> None:
        self._bus = bus
        self._stream = stream
        self._group = group
        self._pattern = pattern
        self._member = member
        self._history = True  # read our pending list before new entries

    async def take_over(self) -> None:
        await self._bus.claim_all(self._stream, self._group, self._member)
        self._history = True

    async def fetch(self, max_batch: int, wait: float) -> list[EngineMessage]:
        r = self._bus.redis
        streams: Any = {self._stream: "0" if self._history else ">"}
        reply: Any = await r.xreadgroup(
            self._group,
            self._member,
            streams,
            count=max_batch,
            block=None if self._history else max(1, int(wait * 1000)),
        )
        # RESP2: [[stream, [(id, {field: value}), ...]]]; a trimmed entry has no fields.
        entries: list[tuple[bytes, dict[bytes, bytes]]] = [
            (i, f) for i, f in (reply[0][1] if reply else []) if f
        ]
        if self._history and not entries:
            self._history = False
            return []
        attempts: dict[bytes, int] = {}
        if self._history:
            pending: Any = await r.xpending_range(
                self._stream,
                self._group,
                min=entries[0][0],
                max=entries[-1][0],
                count=len(entries),
                consumername=self._member,
            )
            attempts = {p["message_id"]: int(p["times_delivered"]) for p in pending}
        messages: list[EngineMessage] = []
        foreign: list[bytes] = []
        for entry_id, fields in entries:
            subject = fields[b"s"].decode()
            if not subjects.matches(self._pattern, subject):
                foreign.append(entry_id)
                continue
            messages.append(
                EngineMessage(
                    subject=subject,
                    key=fields[b"k"].decode(),
                    data=fields[b"d"],
                    msg_id=fields[b"i"].decode(),
                    attempt=attempts.get(entry_id, 1),
                    handle=entry_id,
                )
            )
        if foreign:
            await r.xack(self._stream, self._group, *foreign)
        return messages

    async def ack(self, messages: Sequence[EngineMessage]) -> None:
        ids = [m.handle for m in messages if isinstance(m.handle, bytes)]
        await self._bus.redis.xack(self._stream, self._group, *ids)
        await self._bus.trim(self._stream)

    async def nak(self, messages: Sequence[EngineMessage]) -> None:
        self._history = True  # they stay in our pending list, read first next time


class RedisBus(Bus, Engine):
    """Bus on Redis Streams; see the module docstring."""

    def __init__(self, settings: BusSettings) -> None:
        self.settings = settings
        self._ns = check_name("namespace", settings.namespace)
        self._redis: aioredis.Redis | None = None
        self._groups: list[DurableGroup] = []
        self._ttl_ms = max(1, int(settings.ack_wait_s * 1000))
        self._broadcast: RedisBroadcast | None = None

    @property
    def redis(self) -> aioredis.Redis:
        if self._redis is None:
            raise BusError("the bus is stopped")
        return self._redis

    async def start(self) -> None:
        timeout = self.settings.request_timeout_s
        # A blocking pool: past POOL_SIZE commands at once, callers wait for a free
        # connection (back-pressure). redis-py's default pool fails the 101st at once
        # ("Too many connections"), which refused device messages under load.
        pool = aioredis.BlockingConnectionPool.from_url(
            self.settings.redis_url,
            max_connections=POOL_SIZE,
            timeout=None,
            socket_connect_timeout=timeout,
            socket_timeout=None,
            protocol=2,  # the reply shapes parsed here
        )
        r = aioredis.Redis.from_pool(pool)  # owns the pool: aclose closes it
        try:
            await r.ping()
        except (OSError, redis.exceptions.RedisError) as exc:
            await r.aclose()
            raise BusError(f"cannot connect to Redis at {self.settings.redis_url}: {exc}") from exc
        self._redis = r
        self._publish = r.register_script(_PUBLISH)
        self._trim = r.register_script(_TRIM)
        self._leases = RedisLeases(r)
        self._heartbeat = r.register_script(_HEARTBEAT)
        self._claim_all = r.register_script(_CLAIM_ALL)

    def broadcast(self) -> RedisBroadcast:
        """Live fan-out on this Redis (`broadcast.py`), made on first use."""
        if self._broadcast is None:
            s = self.settings
            self._broadcast = RedisBroadcast(self.redis, s.redis_url, self._ns, s.request_timeout_s)
        return self._broadcast

    async def stop(self) -> None:
        groups, self._groups = self._groups, []
        for group in groups:
            await group.close()
        self._broadcast = None
        r, self._redis = self._redis, None
        if r is not None:
            await r.aclose()

    def stream(self, space: str, partition: int) -> str:
        return f"{self._ns}:{space}:p{partition}"

    # -- publishing ---------------------------------------------------------------

    async def publish(
        self, subject: str, data: bytes, *, key: str, msg_id: str, timeout: float | None = None
    ) -> None:
        await self._add(subject, data, key, msg_id, f"{self._ns}:dedup:{msg_id}", timeout)

    async def _add(
        self,
        subject: str,
        data: bytes,
        key: str,
        msg_id: str,
        dedup: str,
        timeout: float | None,
        extra: tuple[str, ...] = (),
    ) -> None:
        _ = self.redis  # BusError when stopped
        space = check_name("subject space", subject.partition(".")[0])
        stream = self.stream(space, subjects.partition_of(key, self.settings.partitions))
        dead = space == self.settings.dead_letter_subject
        cap = 0 if dead else self.settings.partition_queue
        minid = (
            f"{int((time.time() - self.settings.dead_letter_max_age_s) * 1000)}-0" if dead else ""
        )
        window = max(1, int(self.settings.dedup_window_s * 1000))
        args: list[Any] = [cap, window, minid, "s", subject, "k", key, "i", msg_id, "d", data]
        args.extend(extra)
        pause = 0.005
        try:
            async with asyncio.timeout(timeout):
                while await self._publish(keys=[stream, dedup], args=args) == -1:
                    await asyncio.sleep(pause)  # full: wait for consumers to make room
                    pause = min(pause * 2, 0.5)
        except TimeoutError:
            raise Overloaded("the bus is full; retry later") from None
        except (OSError, redis.exceptions.RedisError) as exc:
            raise BusError(f"cannot publish {subject}: {exc}") from exc

    async def claim_all(self, stream: str, group: str, member: str) -> None:
        """Make `member` the owner of every pending entry of `group` in `stream`."""
        await self._claim_all(keys=[stream], args=[group, member])

    async def trim(self, stream: str) -> None:
        """Drop the entries every group has acked."""
        await self._trim(keys=[stream])

    # -- consuming ----------------------------------------------------------------

    async def subscribe(
        self, pattern: str, group: str, handler: BatchHandler, *, max_batch: int | None = None
    ) -> Subscription:
        sub = DurableGroup(
            self, pattern, group, handler, self.settings, max_batch or self.settings.max_batch
        )
        await sub.start()
        self._groups.append(sub)
        return sub

    async def prepare_group(self, gid: str, pattern: str) -> None:
        space, _ = split_pattern(pattern)
        for p in range(self.settings.partitions):
            try:
                await self.redis.xgroup_create(self.stream(space, p), gid, id="0", mkstream=True)
            except redis.exceptions.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise BusError(f"cannot create group {gid}: {exc}") from exc

    async def open_source(self, gid: str, pattern: str, partition: int, member: str) -> Source:
        stream = self.stream(split_pattern(pattern)[0], partition)
        return _RedisSource(self, stream, gid, pattern, member)

    async def dead_letter(self, group: str, message: EngineMessage, reason: str) -> None:
        subject = dead_letter_subject(self.settings, group, message.subject)
        await self._add(
            subject,
            message.data,
            message.key,
            message.msg_id,
            f"{self._ns}:dedup:{group}/{message.msg_id}",
            self.settings.request_timeout_s,
            ("r", reason),
        )

    # -- leases -------------------------------------------------------------------

    async def acquire(self, lease: str, member: str) -> bool:
        return await self._leases.acquire(f"{self._ns}:lease:{lease}", member, self._ttl_ms)

    async def renew(self, lease: str, member: str) -> bool:
        return await self._leases.renew(f"{self._ns}:lease:{lease}", member, self._ttl_ms)

    async def release(self, lease: str, member: str) -> None:
        await self._leases.release(f"{self._ns}:lease:{lease}", member)

    async def heartbeat(self, gid: str, member: str) -> int:
        key = f"{self._ns}:members:{gid}"
        return int(await self._heartbeat(keys=[key], args=[member, self._ttl_ms]))

    async def leave(self, gid: str, member: str) -> None:
        await self.redis.zrem(f"{self._ns}:members:{gid}", member)

    # -- for tests and operators ----------------------------------------------------

    async def delete_everything(self) -> None:
        """Delete every key of this namespace (tests)."""
        keys = [k async for k in self.redis.scan_iter(match=f"{self._ns}:*", count=1000)]
        for i in range(0, len(keys), 500):
            await self.redis.delete(*keys[i : i + 500])
