"""Latest values in Redis beyond the shared contract: several writers, a fill racing an
update, an outage (ingest goes on, reads go to the store, stale hashes are dropped once
Redis is back), and `iotmesh run` with `storage.latest = "redis"` end to end."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import redis.asyncio as aioredis

from iotmesh.core.types import TelemetryMessage, TsPoint, TsRecord
from iotmesh.storage.redis import RedisLatestValues
from iotmesh.storage.redis.latest import decode_point, encode_point
from tests.integration.server import start_server
from tests.redis_hot import REDIS_URL, HotFactory, RedisOutage, dead_port


def msg(device_id: str, ts: int, values: dict[str, Any]) -> TelemetryMessage:
    return TelemetryMessage("m", device_id, 0, [TsRecord(ts, values)])


async def test_concurrent_writers_keep_the_newest(redis_hot: HotFactory) -> None:
    writers = [RedisLatestValues(await redis_hot()) for _ in range(4)]
    await writers[0].fill("d", {})
    # Every writer commits every timestamp of a key, in its own (shuffled) order.
    orders = [list(range(50)), list(range(49, -1, -1)), list(range(0, 50, 2)), [49, 0, 25]]
    await asyncio.gather(
        *(
            w.update([msg("d", ts, {"k": ts, f"w{i}": ts}) for ts in order])
            for i, (w, order) in enumerate(zip(writers, orders, strict=True))
        )
    )
    got = await writers[1].get("d")
    assert got is not None
    assert got["k"] == TsPoint(49, 49)
    assert [got[f"w{i}"].ts for i in range(4)] == [max(order) for order in orders]


async def test_a_fill_with_older_store_values_keeps_a_newer_update(redis_hot: HotFactory) -> None:
    latest = RedisLatestValues(await redis_hot())
    # The API read the store (ts 1); a commit of ts 2 landed before its fill.
    await latest.update([msg("d", 2, {"t": 2})])
    await latest.fill("d", {"t": TsPoint(1, 1), "h": TsPoint(1, 50)})
    assert await latest.get("d") == {"t": TsPoint(2, 2), "h": TsPoint(1, 50)}


async def test_ttl_is_set_on_update(redis_hot: HotFactory) -> None:
    hot = await redis_hot(latest_ttl_s=60)
    latest = RedisLatestValues(hot)
    await latest.fill("d", {"t": TsPoint(1, 1)})
    ttl = await hot.redis.pttl(hot.key("latest", "d"))
    assert 0 < ttl <= 60_000


async def test_redis_down_is_a_miss_and_never_an_error(redis_hot: HotFactory) -> None:
    hot = await redis_hot(url=f"redis://127.0.0.1:{dead_port()}/15", timeout_s=0.5)
    latest = RedisLatestValues(hot)
    await latest.fill("d", {"t": TsPoint(1, 1)})
    await latest.update([msg("d", 2, {"t": 2})])
    await latest.update([msg("d", 3, {"t": 3})])  # skipped: Redis failed just now
    await latest.invalidate("d")
    assert await latest.get("d") is None
    assert await latest.get("other") is None
    assert hot.errors["latest_update"] == 1
    assert hot.errors["latest_update_skipped"] == 1
    assert hot.errors["latest_get"] == 1
    assert hot.health().ok


async def test_after_an_outage_the_devices_it_missed_are_dropped(redis_hot: HotFactory) -> None:
    outage = RedisOutage()
    await outage.start()
    relayed = RedisLatestValues(await redis_hot(url=outage.url, timeout_s=0.5))
    other = RedisLatestValues(await redis_hot())
    await relayed.fill("missed", {"t": TsPoint(1, 1)})
    await relayed.fill("kept", {"t": TsPoint(1, 1)})
    await outage.cut()
    await relayed.update([msg("missed", 2, {"t": 2})])  # lost: the hash is stale now
    assert await other.get("missed") == {"t": TsPoint(1, 1)}
    assert await relayed.get("missed") is None  # this process knows: the store is read
    await outage.start()  # Redis is back (same port)
    async with asyncio.timeout(10):  # updates skip Redis for a moment after a failure
        while await other.get("missed") is not None:
            await relayed.update([msg("kept", 3, {"t": 3})])
            await asyncio.sleep(0.05)
    # "kept" had updates skipped too (right after the failure): a miss or the newest,
    # never the stale value.
    assert await other.get("kept") in (None, {"t": TsPoint(3, 3)})
    assert await relayed.get("missed") is None  # gone from Redis: a miss, then filled
    await outage.cut()


def test_encoding_is_ts_then_msgpack() -> None:
    assert encode_point(-5, "x") == b"-5:\xa1x"
    assert decode_point(encode_point(1700000000000, {"a": 1})) == TsPoint(1700000000000, {"a": 1})


def test_run_serves_latest_values_from_redis(tmp_path: Path) -> None:
    namespace = f"run{time.monotonic_ns()}"
    env = {
        "IOTMESH_STORAGE__LATEST": "redis",
        "IOTMESH_STORAGE__REDIS__URL": REDIS_URL,
        "IOTMESH_STORAGE__REDIS__NAMESPACE": namespace,
    }
    srv = start_server(tmp_path / "data", tmp_path / "logs", env=env)
    try:
        with srv.admin() as admin:
            device = admin.post("/api/v1/devices", json={"name": "s"}).json()
            token, device_id = device["access_token"], device["id"]
            base = str(admin.base_url)
            r = httpx.post(f"{base}/api/v1/{token}/telemetry", json={"ts": 10, "values": {"t": 1}})
            assert r.status_code == 200
            latest = f"/api/v1/devices/{device_id}/telemetry/latest"
            assert admin.get(latest).json() == {"t": [{"ts": 10, "value": 1}]}  # miss → fill
            r = httpx.post(f"{base}/api/v1/{token}/telemetry", json={"ts": 20, "values": {"t": 2}})
            assert r.status_code == 200
            assert admin.get(latest).json() == {"t": [{"ts": 20, "value": 2}]}
            raw = asyncio.run(_hgetall(f"{namespace}:latest:{device_id}"))
            assert raw[b""] == b"1"
            assert decode_point(raw[b"t"]) == TsPoint(20, 2)
    finally:
        srv.stop()
        asyncio.run(_delete(f"{namespace}:*"))


async def _hgetall(key: str) -> dict[bytes, bytes]:
    r = aioredis.Redis.from_url(REDIS_URL)
    try:
        raw: dict[bytes, bytes] = await r.hgetall(key)
        return raw
    finally:
        await r.aclose()


async def _delete(pattern: str) -> None:
    r = aioredis.Redis.from_url(REDIS_URL)
    try:
        keys = [k async for k in r.scan_iter(match=pattern)]
        if keys:
            await r.delete(*keys)
    finally:
        await r.aclose()
