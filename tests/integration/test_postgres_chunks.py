"""The PostgreSQL time-series store's chunks (`storage/postgres/tschunks.py`): points
moved from rows into packed per-series blocks must change no answer, whatever was
written, rewritten (with another kind), deleted and compacted in between, and in
whatever order. Checked against a model (a dict of ts to value, answered by
`storage/aggregate.py`) on generated histories; plus the schema upgrade from before
chunks, compaction racing writers, and the background task."""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iotmesh.core.errors import PayloadError, StorageError
from iotmesh.core.types import Aggregation, Order, TsRecord
from iotmesh.storage import aggregate
from iotmesh.storage.points import Points
from iotmesh.storage.postgres import PostgresTimeSeriesStore, timeseries, tsschema
from iotmesh.storage.postgres.connection import migrate, schema_version
from iotmesh.storage.postgres.tschunks import CHUNK_SPAN_MS
from iotmesh.storage.rollup import RetentionPolicy
from iotmesh.storage.timeseries import Query, SeriesWrite
from tests.postgres import PgServer

H = CHUNK_SPAN_MS
# Rollup levels of the stores whose answers are checked against the model: the model's
# intervals of a second and a minute, and an hour (H + 1 and 7 read raw points).
LEVELS = (1000, 60_000, H)
# (start, end, limit) of the queries checked: all, a window cutting blocks with a small
# limit (a raw one reads only some chunks), one ts.
RANGES = [(-4 * H, 4 * H, 10_000), (-H + 5, H - 5, 3), (0, 0, 1)]
VALUES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.integers(min_value=-1000, max_value=1000),
    st.booleans(),
    st.text(max_size=3),
    st.none(),
    st.lists(st.integers(min_value=0, max_value=9), max_size=2),
)
# Timestamps over a few blocks either side of the epoch, some on block edges.
STAMPS = st.one_of(
    st.integers(min_value=-3 * H, max_value=3 * H),
    st.sampled_from([-H - 1, -H, -1, 0, 1, H - 1, H, 2 * H - 1]),
)
WRITE = st.tuples(st.just("write"), st.dictionaries(STAMPS, VALUES, min_size=1, max_size=25))
COMPACT = st.tuples(st.just("compact"), st.booleans())
DELETE = st.tuples(st.just("delete"), st.tuples(STAMPS, STAMPS))
OPS = st.lists(st.one_of(WRITE, WRITE, COMPACT, DELETE), min_size=1, max_size=8)


@pytest.fixture
def opened(postgres: PgServer, tmp_path: Path) -> Iterator[tuple[asyncio.Runner, Any]]:
    """A store opened on an event loop of its own, which the examples run on; its
    background compaction stopped, so that the examples choose when to compact."""
    runner = asyncio.Runner()
    settings = postgres.settings(str(tmp_path), partition_interval_s=3600)
    store = PostgresTimeSeriesStore(settings, LEVELS)
    runner.run(store.open())
    runner.run(_stop_background(store))
    try:
        yield runner, store
    finally:
        runner.run(store.close())
        runner.close()


async def _stop_background(store: PostgresTimeSeriesStore) -> None:
    task = store._compactor
    assert task is not None
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    store._compactor = None


def _same(got: Any, want: Any) -> bool:
    if type(got) is not type(want):
        return False
    if isinstance(got, float):
        return (math.isnan(got) and math.isnan(want)) or math.isclose(
            got, want, rel_tol=1e-9, abs_tol=1e-9
        )
    return bool(got == want)


def _expected(model: dict[int, Any], q: Query) -> list[Any] | None:
    """The model's answer to `q` as TsPoints; None when the store must refuse it."""
    if not model:
        return []
    ts = sorted(model)
    points = Points.from_values(ts, [model[t] for t in ts]).window(q.start_ts, q.end_ts)
    if q.agg is Aggregation.NONE:
        return aggregate.to_ts_points(points, q.order, q.limit)
    if len(points) == 0:
        return []
    try:
        aggregate.check_buckets(int(points.ts[0]), int(points.ts[-1]), q.interval_ms)
    except PayloadError:
        return None
    return aggregate.to_ts_points(
        aggregate.aggregate(points, q.agg, q.interval_ms), q.order, q.limit
    )


async def _check(store: PostgresTimeSeriesStore, entity: str, model: dict[int, Any]) -> None:
    for agg, interval in [
        (Aggregation.NONE, 0),
        (Aggregation.AVG, 60_000),
        (Aggregation.SUM, 7),
        (Aggregation.MIN, H + 1),
        (Aggregation.MAX, 1000),
        (Aggregation.COUNT, H),
    ]:
        for order in Order:
            for start, end, limit in RANGES:
                q = Query(entity, ("v",), start, end, agg, interval, limit, order)
                want = _expected(model, q)
                if want is None:
                    with pytest.raises(PayloadError, match="buckets"):
                        await store.query(q)
                    continue
                got = (await store.query(q)).get("v", [])
                assert [p.ts for p in got] == [p.ts for p in want], q
                for g, w in zip(got, want, strict=True):
                    assert _same(g.value, w.value), (q, g, w)
    latest = await store.latest(entity)
    if model:
        newest = max(model)
        assert latest["v"].ts == newest
        assert _same(latest["v"].value, Points.from_values([newest], [model[newest]]).values()[0])
    else:
        assert latest == {}


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=OPS)
def test_chunks_change_no_answer(opened: tuple[asyncio.Runner, Any], ops: list[Any]) -> None:
    runner, store = opened
    entity = str(uuid.uuid4())
    model: dict[int, Any] = {}

    async def run() -> None:
        for op, arg in ops:
            if op == "write":
                records = [TsRecord(ts, {"v": v}) for ts, v in arg.items()]
                await store.write([SeriesWrite(entity, records)])
                model.update(arg)
            elif op == "compact":
                await store.compact(everything=arg)
            else:
                lo, hi = sorted(arg)
                deleted = await store.delete(entity, ["v"], lo, hi)
                gone = [t for t in model if lo <= t <= hi]
                assert deleted == len(gone)
                for t in gone:
                    del model[t]
        await _check(store, entity, model)
        await store.compact(everything=True)
        await _check(store, entity, model)

    runner.run(run())


async def test_compaction_racing_writers_loses_nothing(postgres: PgServer, tmp_path: Path) -> None:
    """Writes rewriting and extending blocks, and deletes, while the blocks are
    compacted: every point's last write is what a query answers, and no statement
    fails (a deadlock between a delete and compaction would)."""
    store = PostgresTimeSeriesStore(postgres.settings(str(tmp_path)), LEVELS)
    await store.open()
    try:
        await _stop_background(store)
        model: dict[int, Any] = {}

        async def writer(n: int) -> None:
            for rnd in range(15):
                batch = {
                    (i * 216_007 + rnd * 31 + n) % (3 * H): float(rnd * 10 + n) for i in range(50)
                }
                for ts, v in batch.items():
                    model[ts] = v
                await store.write(
                    [SeriesWrite("d", [TsRecord(t, {"v": v}) for t, v in batch.items()])]
                )
                if rnd % 3 == 2:  # a delete across a block edge, racing compaction too
                    lo = H - 200_000 * rnd
                    hi = lo + 400_000
                    gone = [t for t in model if lo <= t <= hi]
                    assert await store.delete("d", ["v"], lo, hi) == len(gone)
                    for t in gone:
                        del model[t]

        async def compactor() -> None:
            for _ in range(20):
                await store.compact(everything=True)
                await asyncio.sleep(0)

        # Writers run one after the other within a task, so the model's order is the
        # writes' order; the compactor runs beside them.
        async def writers() -> None:
            for n in range(3):
                await writer(n)

        await asyncio.gather(writers(), compactor())
        await _check(store, "d", model)
        await store.compact(everything=True)
        await _check(store, "d", model)
    finally:
        await store.close()


async def test_schema_before_chunks_upgrades_and_keeps_points(
    postgres: PgServer, tmp_path: Path
) -> None:
    """A time-series schema of version 1 (rows only, as the previous release made it)
    gains `ts_chunks`; its points answer the same before and after compaction."""
    settings = postgres.settings(str(tmp_path), partition_interval_s=3600)
    schema = settings.schema_name
    model = {t * 1000: float(t) for t in range(-7200, 7200, 7)}
    newest = max(model)
    conn = await asyncpg.connect(postgres.url, server_settings={"search_path": schema})
    try:
        applied = await migrate(conn, schema, tsschema.COMPONENT, tsschema.migrations(settings)[:1])
        assert applied == 1
        parts = await tsschema.Partitions.load(conn)
        await parts.create(conn, parts.missing(np.array(list(model), np.int64)))
        await conn.execute("INSERT INTO ts_series (entity_id, key) VALUES ('d', 'v')")
        await conn.executemany(
            "INSERT INTO ts_points (series_id, ts, kind, v_d) VALUES (1, $1, 0, $2)",
            list(model.items()),
        )
        await conn.execute(
            "INSERT INTO ts_latest (series_id, ts, kind, v_d) VALUES (1, $1, 0, $2)",
            newest,
            model[newest],
        )
    finally:
        await conn.close()

    store = PostgresTimeSeriesStore(settings)
    await store.open()
    try:
        await _stop_background(store)
        await _check(store, "d", model)
        assert await store.compact() > 0  # the blocks before the newest one
        await _check(store, "d", model)
        gone = [t for t in model if -H <= t <= 0]
        assert await store.delete("d", ["v"], -H, 0) == len(gone)
        for t in gone:
            del model[t]
        await _check(store, "d", model)
    finally:
        await store.close()
    conn = await asyncpg.connect(postgres.url, server_settings={"search_path": schema})
    try:
        assert await schema_version(conn, tsschema.COMPONENT) == len(tsschema.migrations(settings))
    finally:
        await conn.close()


async def test_background_task_compacts_older_blocks(
    postgres: PgServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(timeseries, "COMPACT_IDLE_S", 0.05)
    settings = postgres.settings(str(tmp_path))
    store = PostgresTimeSeriesStore(settings)
    await store.open()
    try:
        model = {t: float(t % 1000) for t in range(0, 3 * H, 10_000)}
        await store.write([SeriesWrite("d", [TsRecord(t, {"v": v}) for t, v in model.items()])])
        conn = await asyncpg.connect(postgres.url)
        try:
            schema = settings.schema_name
            async with asyncio.timeout(30):
                while True:
                    blocks = await conn.fetch(f'SELECT block FROM "{schema}".ts_chunks ORDER BY 1')
                    if len(blocks) == 2:
                        break
                    await asyncio.sleep(0.05)
            # The newest block stays as rows.
            assert [r[0] for r in blocks] == [0, 1]
            rows = await conn.fetchval(f'SELECT count(*) FROM "{schema}".ts_points')
            assert rows == len([t for t in model if t >= 2 * H])
        finally:
            await conn.close()
        await _check(store, "d", model)
    finally:
        await store.close()


@pytest.mark.parametrize("cutoff", [2 * H + 600_000, 2 * H])
async def test_retention_expires_chunks(postgres: PgServer, tmp_path: Path, cutoff: int) -> None:
    """Raw TTLs reach packed points: whole blocks before the cutoff go, the block it
    cuts is rewritten, rows and chunks alike."""
    store = PostgresTimeSeriesStore(postgres.settings(str(tmp_path)))
    await store.open()
    try:
        await _stop_background(store)
        model = {t: float(t % 977) for t in range(0, 4 * H, 60_000)}
        records = [TsRecord(t, {"v": v}) for t, v in model.items()]
        await store.write([SeriesWrite("d", records), SeriesWrite("kept", records)])
        await store.compact()  # blocks 0-2 packed, block 3 rows
        await store.write([SeriesWrite("d", [TsRecord(H + 5, {"v": "late"})])])  # a row
        now = 10 * H
        policy = RetentionPolicy(now_ms=now, raw_ttl_ms=now - cutoff, entities={"kept": 0})
        await store.apply_retention(policy)
        await _check(store, "d", {t: v for t, v in model.items() if t >= cutoff})
        model[H + 5] = "late"
        await _check(store, "kept", {t: v for t, v in model.items() if t != H + 5})
    finally:
        await store.close()


async def test_retention_with_a_stale_fencing_token_is_refused(
    postgres: PgServer, tmp_path: Path
) -> None:
    """A pass of a deposed leader (a token older than one recorded in `fences`) rolls
    back and deletes nothing; the current token, again or newer, is accepted."""
    store = PostgresTimeSeriesStore(postgres.settings(str(tmp_path)))
    await store.open()
    try:
        await _stop_background(store)
        minute = 60_000
        model = {t: float(t) for t in range(0, 10 * minute, minute)}
        await store.write([SeriesWrite("d", [TsRecord(t, {"v": v}) for t, v in model.items()])])
        now = 10 * minute
        await store.apply_retention(RetentionPolicy(now, 8 * minute, fencing_token=7))
        await _check(store, "d", {t: v for t, v in model.items() if t >= 2 * minute})
        stale = RetentionPolicy(now, 2 * minute, fencing_token=6)
        with pytest.raises(StorageError, match="fencing token 6 is older than 7"):
            await store.apply_retention(stale)
        await _check(store, "d", {t: v for t, v in model.items() if t >= 2 * minute})
        await store.apply_retention(msgspec.structs.replace(stale, fencing_token=7))
        await _check(store, "d", {t: v for t, v in model.items() if t >= 8 * minute})
    finally:
        await store.close()
