"""The contract of `TimeSeriesStore`: every backend must pass this whole suite.

The rules tested are those of the module docstring of `iotmesh.storage.timeseries`.
Besides targeted cases, `test_matches_model` writes random batches (out of order,
overwrites, mixed kinds) and compares many queries with a small in-test model.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Sequence
from typing import Any

import pytest

from iotmesh.core.errors import PayloadError
from iotmesh.core.types import Aggregation, Order, TsPoint, TsRecord
from iotmesh.storage.timeseries import Query, SeriesWrite, TimeSeriesStore
from tests.contract.conftest import Backend

DEV = "device-1"
MINUTE = 60_000


def rec(ts: int, **values: Any) -> TsRecord:
    return TsRecord(ts, values)


async def put(store: TimeSeriesStore, *records: TsRecord, entity: str = DEV) -> None:
    await store.write([SeriesWrite(entity, list(records))])


def query(
    *keys: str,
    start: int = 0,
    end: int = 999_999,
    agg: Aggregation = Aggregation.NONE,
    interval: int = 0,
    limit: int = 100,
    order: Order = Order.ASC,
    entity: str = DEV,
) -> Query:
    return Query(entity, keys, start, end, agg, interval, limit, order)


def pairs(points: Sequence[TsPoint]) -> list[tuple[int, Any]]:
    return [(p.ts, p.value) for p in points]


def typed(points: Sequence[TsPoint]) -> list[tuple[int, type, Any]]:
    """Points with the value's type, so 1 and 1.0 and True are told apart."""
    return [(p.ts, type(p.value), p.value) for p in points]


# -- values -------------------------------------------------------------------------


async def test_every_value_kind_round_trips(store: TimeSeriesStore) -> None:
    values: dict[str, Any] = {
        "double": 21.5,
        "whole_double": 3.0,
        "long": 42,
        "negative": -(2**63),
        "bool": True,
        "string": "on",
        "empty_string": "",
        "object": {"a": 1, "b": [1, 2.5, None, "x"], "c": {"d": False}},
        "array": [1, "two", 3.0],
    }
    await put(store, rec(1000, **values))
    got = await store.query(query(*values))
    assert {k: typed(v) for k, v in got.items()} == {
        k: [(1000, type(v), v)] for k, v in values.items()
    }


async def test_ints_outside_int64_are_stored_as_doubles(store: TimeSeriesStore) -> None:
    await put(store, rec(1, big=2**63, small=-(2**63) - 1), rec(2, big=5))
    got = await store.query(query("big", "small"))
    assert typed(got["big"]) == [(1, float, float(2**63)), (2, int, 5)]
    assert typed(got["small"]) == [(1, float, float(-(2**63) - 1))]


async def test_bool_is_not_a_long(store: TimeSeriesStore) -> None:
    await put(store, rec(1, flag=True), rec(2, flag=1), rec(3, flag=False), rec(4, flag=0))
    got = await store.query(query("flag"))
    assert typed(got["flag"]) == [(1, bool, True), (2, int, 1), (3, bool, False), (4, int, 0)]


# -- ranges, order, limit -----------------------------------------------------------


async def test_range_bounds_are_inclusive(store: TimeSeriesStore) -> None:
    await put(store, *(rec(ts, t=ts) for ts in range(10, 60, 10)))
    got = await store.query(query("t", start=20, end=40))
    assert pairs(got["t"]) == [(20, 20), (30, 30), (40, 40)]
    got = await store.query(query("t", start=40, end=40))
    assert pairs(got["t"]) == [(40, 40)]


async def test_order_and_limit(store: TimeSeriesStore) -> None:
    await put(store, *(rec(ts, t=ts) for ts in range(1, 51)))
    asc = await store.query(query("t", limit=3, order=Order.ASC))
    desc = await store.query(query("t", limit=3, order=Order.DESC))
    assert pairs(asc["t"]) == [(1, 1), (2, 2), (3, 3)]
    assert pairs(desc["t"]) == [(50, 50), (49, 49), (48, 48)]
    everything = await store.query(query("t", limit=1000, order=Order.DESC))
    assert [p.ts for p in everything["t"]] == list(range(50, 0, -1))


async def test_limit_applies_per_key(store: TimeSeriesStore) -> None:
    await put(store, *(rec(ts, a=ts, b=-ts) for ts in range(1, 11)))
    got = await store.query(query("a", "b", limit=2, order=Order.DESC))
    assert pairs(got["a"]) == [(10, 10), (9, 9)]
    assert pairs(got["b"]) == [(10, -10), (9, -9)]


async def test_empty_results(store: TimeSeriesStore) -> None:
    assert await store.query(query("t")) == {}
    await put(store, rec(100, t=1.0))
    assert await store.query(query("t", start=101, end=200)) == {}
    assert await store.query(query("t", entity="other")) == {}
    assert await store.query(query("missing")) == {}
    got = await store.query(query("t", "missing"))
    assert list(got) == ["t"]
    assert await store.query(query("t", start=200, agg=Aggregation.AVG, interval=10)) == {}
    assert await store.latest("other") == {}
    assert await store.keys("other") == []


# -- overwrites ---------------------------------------------------------------------


async def test_same_ts_again_replaces_the_value(store: TimeSeriesStore) -> None:
    await put(store, rec(1, t=1.0), rec(2, t=2.0))
    await put(store, rec(2, t=20.0))
    await put(store, rec(1, t="text"))  # a different kind replaces too
    got = await store.query(query("t"))
    assert pairs(got["t"]) == [(1, "text"), (2, 20.0)]
    count = await store.query(query("t", agg=Aggregation.COUNT, interval=MINUTE))
    assert pairs(count["t"]) == [(0, 2)]


async def test_later_record_in_one_batch_wins(store: TimeSeriesStore) -> None:
    await store.write(
        [
            SeriesWrite(DEV, [rec(5, t=1.0), rec(3, t=3.0), rec(5, t=2.0)]),
            SeriesWrite(DEV, [rec(5, t=7), rec(3, t=False)]),
        ]
    )
    got = await store.query(query("t"))
    assert typed(got["t"]) == [(3, bool, False), (5, int, 7)]
    latest = await store.latest(DEV)
    assert latest["t"] == TsPoint(5, 7)


# -- aggregation --------------------------------------------------------------------


async def test_aggregations_per_bucket(store: TimeSeriesStore) -> None:
    # Bucket [0, 60s): longs 1, 2, 6. Bucket [60s, 120s): 1.5 and long 4. Bucket [180s,
    # 240s): only a string and a bool (no numeric point). Bucket [240s, 300s): double 2.0.
    await put(
        store,
        rec(1_000, v=1),
        rec(2_000, v=2),
        rec(59_999, v=6),
        rec(60_000, v=1.5),
        rec(61_000, v=4),
        rec(180_000, v="x"),
        rec(190_000, v=True),
        rec(250_000, v=2.0),
    )

    async def run(agg: Aggregation) -> list[tuple[int, type, Any]]:
        got = await store.query(query("v", agg=agg, interval=MINUTE))
        return typed(got["v"])

    assert await run(Aggregation.AVG) == [
        (0, float, 3.0),
        (60_000, float, 2.75),
        (240_000, float, 2.0),
    ]
    assert await run(Aggregation.SUM) == [(0, int, 9), (60_000, float, 5.5), (240_000, float, 2.0)]
    assert await run(Aggregation.MIN) == [(0, int, 1), (60_000, float, 1.5), (240_000, float, 2.0)]
    assert await run(Aggregation.MAX) == [(0, int, 6), (60_000, float, 4.0), (240_000, float, 2.0)]
    assert await run(Aggregation.COUNT) == [
        (0, int, 3),
        (60_000, int, 2),
        (180_000, int, 2),
        (240_000, int, 1),
    ]


async def test_aggregation_order_limit_and_range(store: TimeSeriesStore) -> None:
    await put(store, *(rec(m * MINUTE + s * 1000, v=m) for m in range(10) for s in (0, 30)))
    got = await store.query(
        query("v", agg=Aggregation.SUM, interval=MINUTE, limit=3, order=Order.DESC)
    )
    assert pairs(got["v"]) == [(9 * MINUTE, 18), (8 * MINUTE, 16), (7 * MINUTE, 14)]
    # The range cuts bucket 2 in half; the bucket keeps its aligned start as ts.
    got = await store.query(
        query(
            "v", start=2 * MINUTE + 10_000, end=4 * MINUTE, agg=Aggregation.COUNT, interval=MINUTE
        )
    )
    assert pairs(got["v"]) == [(2 * MINUTE, 1), (3 * MINUTE, 2), (4 * MINUTE, 1)]


async def test_only_non_numeric_points_give_no_buckets(store: TimeSeriesStore) -> None:
    await put(store, rec(1, s="a"), rec(2, s=True), rec(3, s={"x": 1}))
    for agg in (Aggregation.AVG, Aggregation.MIN, Aggregation.MAX, Aggregation.SUM):
        assert await store.query(query("s", agg=agg, interval=10)) == {}
    got = await store.query(query("s", agg=Aggregation.COUNT, interval=10))
    assert pairs(got["s"]) == [(0, 3)]


async def test_long_sums_are_exact(store: TimeSeriesStore) -> None:
    big = 2**62
    await put(store, rec(1, v=big + 1), rec(2, v=big + 2), rec(3, v=big + 3))
    got = await store.query(query("v", agg=Aggregation.SUM, interval=10))
    assert typed(got["v"]) == [(0, int, 3 * big + 6)]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"agg": Aggregation.AVG, "interval_ms": 0}, "interval_ms"),
        ({"agg": Aggregation.SUM, "interval_ms": -5}, "interval_ms"),
        ({"start_ts": 10, "end_ts": 5}, "start_ts"),
        ({"agg": Aggregation.AVG, "interval_ms": 1}, "buckets"),
        ({"limit": 0}, "limit"),
    ],
)
async def test_bad_queries_are_refused(
    store: TimeSeriesStore, changes: dict[str, Any], message: str
) -> None:
    await put(store, rec(0, t=1.0), rec(10**9, t=2.0))  # data over 10**9 ms
    fields = {"entity_id": DEV, "keys": ("t",), "start_ts": 0, "end_ts": 10**9} | changes
    with pytest.raises(PayloadError, match=message):
        await store.query(Query(**fields))


async def test_open_range_aggregation_counts_buckets_where_data_is(
    store: TimeSeriesStore,
) -> None:
    # The API's default range starts at 0: that alone must not count as 28M buckets.
    now = 1_700_000_000_000
    await put(store, *(rec(now + i * 1000, t=float(i)) for i in range(5)))
    q = Query(DEV, ("t",), 0, now + 10**6, Aggregation.AVG, MINUTE, 100, Order.ASC)
    got = await store.query(q)
    assert pairs(got["t"]) == [(now - now % MINUTE, 2.0)]


# -- latest, keys, delete -----------------------------------------------------------


async def test_latest_keeps_the_newest_ts(store: TimeSeriesStore) -> None:
    await put(store, rec(100, t=1.0, s="a"))
    await put(store, rec(50, t=0.5))  # older, written later: not the latest
    await put(store, rec(100, s="b"))  # same ts, written later: replaces
    await put(store, rec(200, j={"k": [1]}))
    assert await store.latest(DEV) == {
        "t": TsPoint(100, 1.0),
        "s": TsPoint(100, "b"),
        "j": TsPoint(200, {"k": [1]}),
    }
    assert await store.latest(DEV, ["t", "missing"]) == {"t": TsPoint(100, 1.0)}
    latest = await store.latest(DEV, ["t"])
    assert type(latest["t"].value) is float


async def test_keys_are_sorted_and_per_entity(store: TimeSeriesStore) -> None:
    await put(store, rec(1, zeta=1, alpha=2, mid=3))
    await put(store, rec(1, other=1), entity="device-2")
    assert await store.keys(DEV) == ["alpha", "mid", "zeta"]
    assert await store.keys("device-2") == ["other"]


async def test_delete_range_counts_and_recomputes_latest(store: TimeSeriesStore) -> None:
    await put(store, *(rec(ts, t=ts, u=ts) for ts in range(1, 11)))
    await put(store, rec(5, t=-5))  # an overwrite counts once
    deleted = await store.delete(DEV, ["t"], 5, 10)
    assert deleted == 6
    got = await store.query(query("t", "u"))
    assert pairs(got["t"]) == [(ts, ts) for ts in range(1, 5)]
    assert len(got["u"]) == 10
    assert (await store.latest(DEV))["t"] == TsPoint(4, 4)
    assert await store.delete(DEV, ["t"], 5, 10) == 0
    assert await store.delete(DEV, ["missing"], 0, 100) == 0


async def test_delete_everything_of_a_key(store: TimeSeriesStore) -> None:
    await put(store, rec(1, t=1, u=1), rec(2, t=2))
    assert await store.delete(DEV, ["t"], 0, 10**13) == 2
    assert await store.latest(DEV) == {"u": TsPoint(1, 1)}
    assert await store.keys(DEV) == ["u"]
    assert await store.query(query("t")) == {}
    await put(store, rec(3, t=3.0))  # the key can be written again
    assert await store.keys(DEV) == ["t", "u"]


async def test_delete_inside_a_chunk_keeps_the_rest(store: TimeSeriesStore) -> None:
    await put(store, *(rec(ts, t=float(ts)) for ts in range(100)))
    assert await store.delete(DEV, ["t"], 10, 19) == 10
    await put(store, rec(15, t="new"))
    got = await store.query(query("t", limit=1000))
    expected = [(ts, float(ts)) for ts in range(100) if not 10 <= ts <= 19]
    assert pairs(got["t"]) == sorted([*expected, (15, "new")])


async def test_delete_entity(store: TimeSeriesStore) -> None:
    await put(store, rec(1, t=1, u="x"))
    await put(store, rec(1, t=2), entity="device-2")
    await store.delete_entity(DEV)
    assert await store.keys(DEV) == []
    assert await store.latest(DEV) == {}
    assert await store.query(query("t", "u")) == {}
    assert pairs((await store.query(query("t", entity="device-2")))["t"]) == [(1, 2)]
    await put(store, rec(5, t=5))  # the entity id can be used again
    assert pairs((await store.query(query("t")))["t"]) == [(5, 5)]


# -- durability, compaction, concurrency --------------------------------------------


async def test_data_survives_close_and_reopen(backend: Backend, tmp_path: Any) -> None:
    store = backend.make(tmp_path)
    await store.open()
    await put(store, rec(1, t=1.5, s="a"), rec(2, t=2))
    await store.close()
    reopened = backend.make(tmp_path)
    await reopened.open()
    try:
        got = await reopened.query(query("t", "s"))
        assert typed(got["t"]) == [(1, float, 1.5), (2, int, 2)]
        assert await reopened.latest(DEV) == {"t": TsPoint(2, 2), "s": TsPoint(1, "a")}
        await put(reopened, rec(2, t=3.0))
        assert pairs((await reopened.query(query("t")))["t"]) == [(1, 1.5), (2, 3.0)]
    finally:
        await reopened.close()


async def test_compaction_does_not_change_answers(store: TimeSeriesStore, backend: Backend) -> None:
    rng = random.Random(7)
    model: dict[int, Any] = {}
    for _ in range(60):  # many small batches: many small chunks, compacted as they come
        batch = []
        for _ in range(rng.randint(1, 4)):
            ts = rng.randrange(0, 400)
            value: Any = rng.choice([rng.random(), rng.randrange(100), "s", False])
            batch.append(rec(ts, v=value))
            model[ts] = value
        await put(store, *batch)
    queries = [
        query("v", limit=1000),
        query("v", limit=7, order=Order.DESC),
        query("v", start=50, end=300, limit=5),
        *(
            query("v", agg=agg, interval=25, limit=1000)
            for agg in Aggregation
            if agg.value != "NONE"
        ),
    ]
    before = [await store.query(q) for q in queries]
    await backend.settle(store)
    after = [await store.query(q) for q in queries]
    assert after == before
    assert pairs(after[0]["v"]) == sorted(model.items())


async def test_overwrites_survive_compaction_in_any_order(
    store: TimeSeriesStore, backend: Backend
) -> None:
    # Old values in small pieces, then a bigger write that replaces some of them, each
    # settled (compacted) on its own: merging the old pieces later must not let them
    # win over the newer write.
    await put(store, *(rec(ts, v="old") for ts in range(100, 103)))
    await backend.settle(store)
    await put(store, *(rec(ts, v="old") for ts in range(200, 203)))
    await backend.settle(store)
    await put(store, *(rec(ts, v="new") for ts in range(100, 120)))
    await backend.settle(store)
    for ts in (300, 400, 500):  # more small writes: more compaction
        await put(store, rec(ts, v="later"))
        await backend.settle(store)
    got = pairs((await store.query(query("v", limit=1000)))["v"])
    assert got == sorted(
        [(ts, "new") for ts in range(100, 120)]
        + [(ts, "old") for ts in range(200, 203)]
        + [(ts, "later") for ts in (300, 400, 500)]
    )


async def test_many_series_keep_their_answers_while_compaction_runs(
    store: TimeSeriesStore, backend: Backend
) -> None:
    """Hundreds of series (SQLite compacts them a few series groups at a time, between
    writes): every answer matches a model before, during and after compaction."""
    rng = random.Random(11)
    devices = [f"dev-{i}" for i in range(300)]  # x 2 keys: 600 series
    model: dict[tuple[str, str], dict[int, float]] = {}

    async def check(sample: Sequence[str]) -> None:
        for device in sample:
            got = await store.query(query("a", "b", end=10_000, limit=10_000, entity=device))
            for key in ("a", "b"):
                want = sorted(model.get((device, key), {}).items())
                assert pairs(got.get(key, [])) == want, (device, key)

    for round_no in range(40):
        batch = []
        for device in rng.sample(devices, rng.randint(20, 300)):
            ts = rng.randrange(0, 200) if rng.random() < 0.2 else 200 + round_no * 10
            values = {key: float(round_no) for key in ("a", "b") if rng.random() < 0.8}
            if values:
                batch.append(SeriesWrite(device, [TsRecord(ts, values)]))
                for key, value in values.items():
                    model.setdefault((device, key), {})[ts] = value
        await store.write(batch)
        if round_no % 5 == 4:
            await check(rng.sample(devices, 10))
    await check(devices[:50])
    await backend.settle(store)
    await check(devices)


async def test_query_during_writes(store: TimeSeriesStore) -> None:
    async def writer() -> None:
        for i in range(30):
            await put(store, *(rec(i * 100 + j, t=float(i)) for j in range(100)))

    async def reader() -> None:
        for _ in range(30):
            got = await store.query(query("t", limit=100_000))
            points = got.get("t", [])
            # A query sees whole batches only: each commit added 100 points.
            assert len(points) % 100 == 0
            assert [p.ts for p in points] == list(range(len(points)))
            await asyncio.sleep(0)

    async with asyncio.TaskGroup() as tg:
        tg.create_task(writer(), name="writer")
        tg.create_task(reader(), name="reader")
    got = await store.query(query("t", limit=100_000))
    assert len(got["t"]) == 3000


async def test_many_devices_per_batch(store: TimeSeriesStore, backend: Backend) -> None:
    # Batches as the pipeline makes them: one SeriesWrite per message, many devices,
    # devices repeating within a batch, later batches rewriting some timestamps.
    devices = [f"dev-{i:03d}" for i in range(150)]
    model: dict[tuple[str, str], dict[int, Any]] = {}
    rng = random.Random(3)
    for round_ in range(6):
        batch = []
        for _ in range(400):
            device = rng.choice(devices)
            ts = rng.randrange(0, 50) + round_ * 10
            values = {"t": rng.random(), "n": rng.randrange(100), "on": rng.random() < 0.5}
            batch.append(SeriesWrite(device, [rec(ts, **values)]))
            for key, value in values.items():
                model.setdefault((device, key), {})[ts] = value
        await store.write(batch)
    for settled in (False, True):
        if settled:
            await backend.settle(store)
        for device in devices[:40]:
            got = await store.query(query("t", "n", "on", limit=1000, entity=device))
            for key in ("t", "n", "on"):
                want = sorted(model.get((device, key), {}).items())
                assert typed(got.get(key, [])) == [(ts, type(v), v) for ts, v in want]
            latest = await store.latest(device)
            for key in ("t", "n", "on"):
                series = model.get((device, key))
                if series:
                    newest = max(series)
                    assert latest[key] == TsPoint(newest, series[newest])


# -- a model check ------------------------------------------------------------------


def model_answer(points: dict[int, Any], q: Query) -> list[tuple[int, Any]]:
    """What a query must answer, computed the slow, obvious way."""
    inside = sorted((ts, v) for ts, v in points.items() if q.start_ts <= ts <= q.end_ts)
    if q.agg is Aggregation.NONE:
        answer = inside
    else:
        buckets: dict[int, list[Any]] = {}
        for ts, v in inside:
            numeric = type(v) in (int, float)
            if q.agg is Aggregation.COUNT or numeric:
                buckets.setdefault(ts - ts % q.interval_ms, []).append(v)
        answer = []
        for start, vs in sorted(buckets.items()):
            all_long = all(type(v) is int for v in vs)
            result: Any
            if q.agg is Aggregation.COUNT:
                result = len(vs)
            elif q.agg is Aggregation.AVG:
                result = sum(vs) / len(vs)
            else:
                fn = {Aggregation.SUM: sum, Aggregation.MIN: min, Aggregation.MAX: max}[q.agg]
                result = fn(vs) if all_long else float(fn(vs))
            answer.append((start, result))
    if q.order is Order.DESC:
        answer.reverse()
    return answer[: q.limit]


def same(got: list[tuple[int, Any]], want: list[tuple[int, Any]]) -> bool:
    if [ts for ts, _ in got] != [ts for ts, _ in want]:
        return False
    for (_, a), (_, b) in zip(got, want, strict=True):
        if type(a) is not type(b):
            return False
        if isinstance(a, float) and not math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9):
            return False
        if not isinstance(a, float) and a != b:
            return False
    return True


@pytest.mark.parametrize("seed", range(4))
async def test_matches_model(store: TimeSeriesStore, backend: Backend, seed: int) -> None:
    rng = random.Random(seed)
    model: dict[int, Any] = {}

    def value() -> Any:
        return rng.choice(
            [rng.uniform(-100, 100), rng.randrange(-1000, 1000), True, "txt", {"a": 1}]
            if rng.random() < 0.2
            else [rng.uniform(-100, 100), rng.randrange(-1000, 1000)]
        )

    for round_ in range(20):
        batch = []
        base = rng.randrange(0, 5000)
        for _ in range(rng.randint(1, 60)):
            ts = base + rng.randrange(0, 400) if rng.random() < 0.9 else rng.randrange(5000)
            v = value()
            batch.append(rec(ts, v=v))
            model[ts] = v
        await put(store, *batch)
        if round_ == 10:
            await store.delete(DEV, ["v"], 1000, 1500)
            model = {ts: v for ts, v in model.items() if not 1000 <= ts <= 1500}
    for settled in (False, True):
        if settled:
            await backend.settle(store)
        for _ in range(40):
            start = rng.randrange(-100, 5000)
            q = query(
                "v",
                start=start,
                end=start + rng.randrange(0, 6000),
                agg=rng.choice(list(Aggregation)),
                interval=rng.choice([1, 7, 100, 1000]),
                limit=rng.choice([1, 3, 50, 10_000]),
                order=rng.choice(list(Order)),
            )
            got = pairs((await store.query(q)).get("v", []))
            want = model_answer(model, q)
            assert same(got, want), (q, got[:5], want[:5])
    latest_ts = max(model)
    assert await store.latest(DEV) == {"v": TsPoint(latest_ts, model[latest_ts])}
