"""The retention job: settings (seconds, device types) become a policy (ms, device ids)."""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from pathlib import Path

import pytest

from iotmesh.cluster import StaleToken
from iotmesh.core.clock import now_ms
from iotmesh.core.settings import RetentionSettings, RollupLevel, SqliteSettings
from iotmesh.core.types import Order, TsRecord
from iotmesh.storage.retention import RetentionJob, build_policy
from iotmesh.storage.sqlite.tsdb import SqliteTimeSeriesStore
from iotmesh.storage.timeseries import Query, SeriesWrite
from tests.unit.doubles import RecordingStore


async def lookup(types: Collection[str]) -> dict[str, list[str]]:
    return {t: ["dev-a", "dev-b"] if t == "sensor" else [] for t in types}


async def test_policy_resolves_device_types_to_ids() -> None:
    settings = RetentionSettings(
        raw_ttl_s=60,
        keys={"temp": 0},
        device_types={"sensor": 7200, "meter": 1.5},
        rollups=[RollupLevel(interval_ms=60_000, ttl_s=86400)],
    )
    policy = await build_policy(settings, lookup, 123)
    assert policy.now_ms == 123
    assert policy.raw_ttl_ms == 60_000
    assert policy.keys == {"temp": 0}
    assert policy.entities == {"dev-a": 7_200_000, "dev-b": 7_200_000}
    assert policy.levels == {60_000: 86_400_000}


async def test_a_pass_expires_raw_points(tmp_path: Path) -> None:
    levels = [60_000, 3_600_000]
    store = SqliteTimeSeriesStore(tmp_path / "ts.db", SqliteSettings(), levels)
    await store.open()
    try:
        now = now_ms()
        old = now - 3 * 86_400_000
        records = [TsRecord(old + i * 60_000, {"v": i}) for i in range(10)]
        records.append(TsRecord(now, {"v": 99}))
        await store.write([SeriesWrite("dev-a", records)])
        job = RetentionJob(store, RetentionSettings(device_types={"sensor": 86400}), lookup)
        await job.start()  # the first pass runs at once
        try:
            for _ in range(200):
                if job.passes:
                    break
                await asyncio.sleep(0.01)
        finally:
            await job.stop()
        assert job.passes == 1
        await store.compact()
        got = await store.query(Query("dev-a", ("v",), 0, now, limit=100, order=Order.ASC))
        assert [p.value for p in got["v"]] == [99]
    finally:
        await store.close()


async def test_nothing_to_expire_starts_no_task() -> None:
    job = RetentionJob(None, RetentionSettings(), lookup)  # type: ignore[arg-type]
    await job.start()
    await job.stop()
    assert job.passes == 0


async def test_a_leader_s_passes_carry_its_token_and_a_refused_fence_skips_the_pass() -> None:
    store = RecordingStore()
    refused = {3}
    checked: list[int] = []

    async def fence(token: int) -> None:
        checked.append(token)
        if token in refused:
            raise StaleToken("retention", token, 4)

    settings = RetentionSettings(raw_ttl_s=60)
    job = RetentionJob(store, settings, lookup, fence)  # type: ignore[arg-type]
    await job.run_once()  # not elected (iotmesh run): no fence, no token
    assert checked == []
    assert store.policies[-1].fencing_token is None
    job.use_token(4)
    await job.run_once()
    assert checked == [4]
    assert store.policies[-1].fencing_token == 4
    job.use_token(3)  # a term older than one the fence saw
    with pytest.raises(StaleToken):
        await job.run_once()
    assert len(store.policies) == 2
    assert job.passes == 2
