"""Connectivity in Redis (`storage.redis.connectivity`): the
`devicestate.connectivity.ConnectivityMirror` of several processes.

Layout, `ns` being `storage.redis.namespace`:
- `<ns>:conn:<device id>`: a hash with `a` (last activity), `t` (the transport of
  that activity), `c` (last connect), `d` (last disconnect), Unix ms; every push merges
  newest-wins, so processes pushing in any order agree.
- `<ns>:conn:sessions:<member>`: this process's open sessions, device id → count,
  expiring `ttl` after the last push (pushes come every `connectivity_flush_s`, so a
  dead process's sessions vanish within `ttl`).
- `<ns>:conn:members`: live members, a sorted set scored by expiry (Redis time).

A push is one script call for all changed devices; a read is one script call (a
consistent snapshot of the device's hash and its count in each live member's
sessions), two when the set of live members changed since the last read.
Error handling: `HotStateError` (counted) from every method; the service falls back.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from iotmesh.core.types import DeviceActivity
from iotmesh.storage.redis.client import HotState, HotStateError

# KEYS: our sessions hash, members zset, then one conn hash per record. ARGV: member,
# ttl ms, full ("1": our sessions are exactly these), then 6 per record: device,
# transport ("" = none), activity, connect, disconnect, our sessions.
# Returns {did our sessions hash exist before, its length after}.
_PUSH = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local existed = redis.call('EXISTS', KEYS[1])
if ARGV[3] == '1' then redis.call('DEL', KEYS[1]) end
local a = 4
for i = 3, #KEYS do
  local dev, tr = ARGV[a], ARGV[a + 1]
  local act, con, dis = tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
  local ses = tonumber(ARGV[a + 5])
  a = a + 6
  local old = redis.call('HMGET', KEYS[i], 'a', 'c', 'd')
  if act > 0 and (not old[1] or act >= tonumber(old[1])) then
    redis.call('HSET', KEYS[i], 'a', act)
    if tr ~= '' then redis.call('HSET', KEYS[i], 't', tr) end
  end
  if not old[2] or con > tonumber(old[2]) then redis.call('HSET', KEYS[i], 'c', con) end
  if not old[3] or dis > tonumber(old[3]) then redis.call('HSET', KEYS[i], 'd', dis) end
  if ses > 0 then redis.call('HSET', KEYS[1], dev, ses) else redis.call('HDEL', KEYS[1], dev) end
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return {existed, redis.call('HLEN', KEYS[1])}
"""

# KEYS: members zset, conn hash, then the sessions hash of each member the caller
# believes alive (ARGV[2..], ARGV[1] being the device). A consistent snapshot: if the
# live members (Redis time) are not those, {0, live members} (the caller asks again);
# else {1, the conn hash (flat), the device's count in each member's sessions}.
_READ = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local live = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf')
local same = #live == #ARGV - 1
if same then
  local expected = {}
  for i = 2, #ARGV do expected[ARGV[i]] = true end
  for _, m in ipairs(live) do
    if not expected[m] then same = false end
  end
end
if not same then return {0, live} end
local counts = {}
for i = 3, #KEYS do counts[#counts + 1] = redis.call('HGET', KEYS[i], ARGV[1]) or '0' end
return {1, redis.call('HGETALL', KEYS[2]), counts}
"""
_READ_ATTEMPTS = 5


class RedisConnectivityMirror:
    """`ConnectivityMirror` on Redis; see the module docstring."""

    def __init__(self, hot: HotState, member: str | None = None) -> None:
        self._hot = hot
        self.member = member or uuid.uuid4().hex
        flush = hot.settings.connectivity_flush_s
        self._ttl_ms = int(max(3.0, 5 * flush) * 1000)
        self._members = hot.key("conn", "members")
        self._had_sessions = False
        self._live: list[str] = []  # the live members at the last read
        self._scripts: dict[str, Any] = {}

    def _sessions(self, member: str) -> str:
        return self._hot.key("conn", "sessions", member)

    def _device(self, device_id: str) -> str:
        return self._hot.key("conn", device_id)

    def _script(self, source: str) -> Any:
        if source not in self._scripts:
            self._scripts[source] = self._hot.redis.register_script(source)
        return self._scripts[source]

    async def push(self, records: Sequence[tuple[DeviceActivity, int]], full: bool) -> bool:
        keys = [self._sessions(self.member), self._members]
        args: list[Any] = [self.member, self._ttl_ms, "1" if full else "0"]
        for activity, sessions in records:
            keys.append(self._device(activity.device_id))
            args += (
                activity.device_id,
                activity.transport or "",
                activity.last_activity_ts,
                activity.last_connect_ts,
                activity.last_disconnect_ts,
                sessions,
            )
        existed, length = await self._hot.call(
            "connectivity_push", self._script(_PUSH)(keys=keys, args=args)
        )
        lost = not full and self._had_sessions and not existed
        self._had_sessions = int(length) > 0
        return lost

    async def fetch(self, device_id: str) -> tuple[DeviceActivity | None, int, int]:
        script = self._script(_READ)
        for _ in range(_READ_ATTEMPTS):
            names = self._live
            keys = [self._members, self._device(device_id), *map(self._sessions, names)]
            reply: list[Any] = await self._hot.call(
                "connectivity_read", script(keys=keys, args=[device_id, *names])
            )
            if reply[0] == 1:
                break
            self._live = [m.decode() for m in reply[1]]  # members changed: again
        else:
            raise HotStateError("the live processes kept changing during a read")
        flat: list[bytes] = reply[1]
        fields = dict(zip(flat[::2], flat[1::2], strict=True))
        counts = {name: int(c) for name, c in zip(names, reply[2], strict=True)}
        if not fields:
            return None, sum(counts.values()), counts.get(self.member, 0)
        transport = fields.get(b"t")
        record = DeviceActivity(
            device_id,
            transport.decode() if transport else None,
            int(fields.get(b"a", 0)),
            int(fields.get(b"c", 0)),
            int(fields.get(b"d", 0)),
        )
        return record, sum(counts.values()), counts.get(self.member, 0)

    async def forget(self, device_id: str) -> None:
        await self._hot.call("connectivity_forget", self._hot.redis.delete(self._device(device_id)))
