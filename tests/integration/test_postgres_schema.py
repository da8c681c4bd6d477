"""Schema migrations of the PostgreSQL stores, on the local server: from an empty schema,
from the previous state schema, several instances starting at once, a newer schema
refused; and the time-series partitions made as data arrives."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import msgspec
import pytest

from iotmesh.core.errors import PayloadError, StorageError
from iotmesh.core.types import (
    AttributeScope,
    DeviceActivity,
    Order,
    RpcRecord,
    RpcStatus,
    TsRecord,
)
from iotmesh.storage.postgres import PostgresStateStore, PostgresTimeSeriesStore, tsschema
from iotmesh.storage.postgres.state import MIGRATIONS
from iotmesh.storage.postgres.tsschema import HIGH_TS
from iotmesh.storage.timeseries import Query, SeriesWrite
from tests.postgres import PgServer

DEVICE_ID = "5f0e6f6a-3c53-4a56-9d1c-7d1d2b5a0001"
DAY = 86_400_000


async def _connect(server: PgServer, schema: str) -> asyncpg.Connection:
    return await asyncpg.connect(server.url, server_settings={"search_path": schema})


async def _versions(server: PgServer, schema: str) -> dict[str, int]:
    conn = await _connect(server, schema)
    try:
        return {r[0]: r[1] for r in await conn.fetch("SELECT * FROM iotmesh_schema")}
    finally:
        await conn.close()


async def test_empty_schema_gets_every_migration(postgres: PgServer, tmp_path: Path) -> None:
    settings = postgres.settings(str(tmp_path))
    state = PostgresStateStore(settings)
    series = PostgresTimeSeriesStore(settings)
    await state.open()
    await series.open()
    await state.close()
    await series.close()
    assert await _versions(postgres, settings.schema_name) == {
        "state": len(MIGRATIONS),
        "timeseries": len(tsschema.migrations(settings)),
    }
    # Opening again applies nothing and keeps working.
    await state.open()
    await state.close()


async def test_previous_state_schema_upgrades_and_keeps_devices(
    postgres: PgServer, tmp_path: Path
) -> None:
    """A schema of version 1 (before stored RPC) keeps its devices and gains the RPC and
    device-activity tables (and the RPC housekeeping job's index and fences)."""
    settings = postgres.settings(str(tmp_path))
    schema = settings.schema_name
    conn = await asyncpg.connect(postgres.url)
    try:
        await conn.execute(f'CREATE SCHEMA "{schema}"; SET search_path = "{schema}"')
        await conn.execute(
            "CREATE TABLE iotmesh_schema (component text PRIMARY KEY, version integer NOT NULL)"
        )
        first = MIGRATIONS[0]
        assert isinstance(first, str)
        await conn.execute(first)
        await conn.execute("INSERT INTO iotmesh_schema VALUES ('state', 1)")
        await conn.execute(
            "INSERT INTO devices (id, name, type, label, created_ts)"
            f" VALUES ('{DEVICE_ID}', 'old', 'default', NULL, 1)"
        )
        await conn.execute(f"INSERT INTO credentials VALUES ('{DEVICE_ID}', 'old-token', 'ab12')")
        await conn.execute(
            f"INSERT INTO attributes VALUES ('{DEVICE_ID}', 'CLIENT', 'fw', '\"1.0\"', 5, 3)"
        )
    finally:
        await conn.close()

    store = PostgresStateStore(settings)
    await store.open()
    try:
        device = await store.device_by_token("old-token")
        assert device is not None
        assert (device.id, device.name, device.cert_fingerprint) == (DEVICE_ID, "old", "ab12")
        (attr,) = await store.get_attributes(DEVICE_ID, AttributeScope.CLIENT)
        assert (attr.key, attr.value, attr.version) == ("fw", "1.0", 3)
        draft = RpcRecord(DEVICE_ID, 0, "m", {"a": 1}, False, True, RpcStatus.QUEUED, 10, 1, 2)
        assert (await store.create_rpc(draft)).id == 1
        done = msgspec.structs.replace(draft, id=1, status=RpcStatus.SUCCESSFUL, finished_ts=5)
        await store.update_rpcs([done])
        assert await store.get_rpc(DEVICE_ID, 1) == done
        assert await store.purge_rpcs(6, 10, fencing_token=1) == 1
        await store.save_activity([DeviceActivity(DEVICE_ID, "mqtt", 3, 2, 1)])
        assert await store.load_activity() == [DeviceActivity(DEVICE_ID, "mqtt", 3, 2, 1)]
    finally:
        await store.close()
    assert (await _versions(postgres, schema))["state"] == len(MIGRATIONS) == 3


async def test_instances_starting_together_migrate_once(postgres: PgServer, tmp_path: Path) -> None:
    settings = postgres.settings(str(tmp_path))
    stores = [PostgresStateStore(settings) for _ in range(3)]
    stores += [PostgresTimeSeriesStore(settings) for _ in range(3)]  # type: ignore[misc]
    await asyncio.gather(*(s.open() for s in stores))
    try:
        assert await _versions(postgres, settings.schema_name) == {
            "state": len(MIGRATIONS),
            "timeseries": len(tsschema.migrations(settings)),
        }
        # Every instance writes to the same partitions, made by whichever came first.
        series = [s for s in stores if isinstance(s, PostgresTimeSeriesStore)]
        await asyncio.gather(
            *(
                s.write([SeriesWrite("d", [TsRecord(i * DAY + n, {"t": n}) for i in range(5)])])
                for n, s in enumerate(series)
            )
        )
        got = await series[0].query(Query("d", ("t",), 0, 10 * DAY, limit=100))
        assert len(got["t"]) == 15
    finally:
        await asyncio.gather(*(s.close() for s in stores))


async def test_newer_schema_is_refused(postgres: PgServer, tmp_path: Path) -> None:
    settings = postgres.settings(str(tmp_path))
    store = PostgresStateStore(settings)
    await store.open()
    await store.close()
    conn = await _connect(postgres, settings.schema_name)
    try:
        await conn.execute("UPDATE iotmesh_schema SET version = 99 WHERE component = 'state'")
    finally:
        await conn.close()
    with pytest.raises(StorageError, match="newer than this release"):
        await store.open()


async def test_partitions_are_made_as_data_arrives(postgres: PgServer, tmp_path: Path) -> None:
    settings = postgres.settings(str(tmp_path), partition_interval_s=86400)
    store = PostgresTimeSeriesStore(settings)
    await store.open()
    try:
        stamps = [-5, 0, DAY - 1, DAY, 3 * DAY + 7, HIGH_TS - 1, HIGH_TS, 2**63 - 1, -(2**63)]
        await store.write([SeriesWrite("d", [TsRecord(ts, {"v": ts}) for ts in stamps])])
        got = await store.query(Query("d", ("v",), -(2**63), 2**63 - 1, limit=100, order=Order.ASC))
        assert [p.ts for p in got["v"]] == sorted(stamps)
        conn = await _connect(postgres, settings.schema_name)
        try:
            names = await conn.fetch(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
                " WHERE i.inhparent = 'ts_points'::regclass ORDER BY 1"
            )
        finally:
            await conn.close()
        last = (HIGH_TS - 1) // DAY
        assert [n[0] for n in names] == sorted(
            [
                "ts_points_after",
                "ts_points_before",
                "ts_points_p0",
                "ts_points_p1",
                "ts_points_p3",
                f"ts_points_p{last}",
            ]
        )
    finally:
        await store.close()
    # A reopened store knows the partitions (and makes none twice); writing in a new
    # interval makes its partition and the next one, ahead of the data.
    await store.open()
    try:
        await store.write([SeriesWrite("d", [TsRecord(DAY + 1, {"v": 1.5})])])
        await store.write([SeriesWrite("d", [TsRecord(5 * DAY, {"v": 5})])])
        conn = await _connect(postgres, settings.schema_name)
        try:
            made = {
                r[0]
                for r in await conn.fetch(
                    "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
                    " WHERE i.inhparent = 'ts_points'::regclass"
                )
            }
        finally:
            await conn.close()
        assert {"ts_points_p5", "ts_points_p6"} <= made
        assert "ts_points_p4" not in made  # only what data needs, and one ahead
    finally:
        await store.close()


async def test_a_partition_is_made_while_a_query_holds_the_table(
    postgres: PgServer, tmp_path: Path
) -> None:
    """A new partition does not wait for queries in progress on ts_points."""
    settings = postgres.settings(str(tmp_path), partition_interval_s=86400)
    store = PostgresTimeSeriesStore(settings)
    await store.open()
    reader = await _connect(postgres, settings.schema_name)
    try:
        await store.write([SeriesWrite("d", [TsRecord(1, {"v": 1})])])
        async with reader.transaction():
            await reader.fetch("SELECT count(*) FROM ts_points")  # holds ACCESS SHARE
            async with asyncio.timeout(5):
                await store.write([SeriesWrite("d", [TsRecord(10 * DAY, {"v": 2})])])
        got = await store.query(Query("d", ("v",), 0, 20 * DAY, order=Order.ASC))
        assert [p.value for p in got["v"]] == [1, 2]
    finally:
        await reader.close()
        await store.close()


async def test_data_postgres_cannot_hold_is_a_payload_error(
    postgres: PgServer, tmp_path: Path
) -> None:
    store = PostgresTimeSeriesStore(postgres.settings(str(tmp_path)))
    await store.open()
    try:
        with pytest.raises(PayloadError):
            await store.write([SeriesWrite("d", [TsRecord(1, {"a\x00b": 1})])])
        with pytest.raises(PayloadError):
            await store.write([SeriesWrite("d", [TsRecord(2**63, {"a": 1})])])
        # A string value holding NUL is kept, exactly.
        await store.write([SeriesWrite("d", [TsRecord(1, {"s": "a\x00b"})])])
        got = await store.query(Query("d", ("s",), 0, 10))
        assert got["s"][0].value == "a\x00b"
        assert (await store.latest("d"))["s"].value == "a\x00b"
    finally:
        await store.close()


async def test_unreachable_server_is_a_storage_error(postgres: PgServer, tmp_path: Path) -> None:
    settings = postgres.settings(str(tmp_path)).model_copy(
        update={"url": "postgresql://postgres@127.0.0.1:1/x", "timeout_s": 2.0}
    )
    with pytest.raises(StorageError, match="cannot connect"):
        await PostgresTimeSeriesStore(settings).open()
    with pytest.raises(StorageError, match="cannot connect"):
        await PostgresStateStore(settings).open()


async def test_batches_without_values_write_nothing(postgres: PgServer, tmp_path: Path) -> None:
    store = PostgresTimeSeriesStore(postgres.settings(str(tmp_path)))
    await store.open()
    try:
        await store.write([])
        await store.write([SeriesWrite("new", [TsRecord(1, {})]), SeriesWrite("other", [])])
        assert await store.keys("new") == []
        assert await store.latest("new") == {}
    finally:
        await store.close()
