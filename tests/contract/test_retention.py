"""The retention contract: raw TTLs, with per-key and per-device overrides, on every backend.

Timestamps are whole minutes, so the alignment of cutoffs to the coarsest rollup level
(SQLite and PostgreSQL: a minute in the contract configuration) changes nothing here.
"""

from __future__ import annotations

from iotmesh.core.types import Order, TsRecord
from iotmesh.storage.rollup import RetentionPolicy
from iotmesh.storage.timeseries import Query, SeriesWrite, TimeSeriesStore
from tests.contract.conftest import Backend

MINUTE = 60_000


async def oldest(store: TimeSeriesStore, entity: str, key: str) -> int | None:
    got = await store.query(Query(entity, (key,), 0, 100 * MINUTE, limit=1, order=Order.ASC))
    return got[key][0].ts if key in got else None


async def test_raw_ttl_with_overrides(store: TimeSeriesStore, backend: Backend) -> None:
    records = [TsRecord(i * MINUTE, {"a": float(i), "b": i, "c": "x"}) for i in range(10)]
    await store.write([SeriesWrite(e, records) for e in ("d1", "d2", "d3")])
    await backend.settle(store)
    policy = RetentionPolicy(
        now_ms=10 * MINUTE,
        raw_ttl_ms=4 * MINUTE,  # everything before minute 6...
        keys={"b": 0, "c": 2 * MINUTE},  # ...except b (forever) and c (before minute 8)
        entities={"d2": 8 * MINUTE},  # d2: before minute 2, or as its key rule says
    )
    await store.apply_retention(policy)
    await backend.settle(store)
    assert [await oldest(store, "d1", k) for k in "abc"] == [6 * MINUTE, 0, 8 * MINUTE]
    assert [await oldest(store, "d2", k) for k in "abc"] == [2 * MINUTE, 0, 2 * MINUTE]
    assert [await oldest(store, "d3", k) for k in "abc"] == [6 * MINUTE, 0, 8 * MINUTE]
    latest = await store.latest("d1")
    assert latest["a"].ts == 9 * MINUTE


async def test_no_ttl_keeps_everything(store: TimeSeriesStore, backend: Backend) -> None:
    await store.write([SeriesWrite("d", [TsRecord(i * MINUTE, {"a": i}) for i in range(5)])])
    await store.apply_retention(RetentionPolicy(now_ms=10**12))
    await backend.settle(store)
    assert await oldest(store, "d", "a") == 0
