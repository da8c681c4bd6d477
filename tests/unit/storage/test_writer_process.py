"""The SQLite writer process: a dead child fails one call and is restarted, not lost."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from iotmesh.core.errors import PayloadError, StorageError
from iotmesh.core.settings import SqliteSettings
from iotmesh.core.types import TsRecord
from iotmesh.storage.sqlite.tsdb import SqliteTimeSeriesStore
from iotmesh.storage.sqlite.writer_client import WriterClient
from iotmesh.storage.timeseries import Query, SeriesWrite

T0 = 1_700_000_000_000


def batch(ts: int, value: float) -> list[SeriesWrite]:
    return [SeriesWrite("dev-1", [TsRecord(ts, {"t": value})])]


async def stored(store: SqliteTimeSeriesStore) -> list[float]:
    points = await store.query(Query("dev-1", ("t",), T0, T0 + 10_000))
    return [p.value for p in sorted(points.get("t", []), key=lambda p: p.ts)]


def child_of(store: SqliteTimeSeriesStore) -> asyncio.subprocess.Process:
    client = store._writer
    assert isinstance(client, WriterClient)
    assert client._proc is not None
    return client._proc


async def test_a_killed_writer_fails_one_call_and_the_next_restarts_it(tmp_path: Path) -> None:
    store = SqliteTimeSeriesStore(tmp_path / "ts.db", SqliteSettings())
    await store.open()
    try:
        await store.write(batch(T0, 1.0))
        child = child_of(store)
        child.kill()
        await child.wait()
        with pytest.raises(StorageError, match="writer process exited"):
            await store.write(batch(T0 + 1, 2.0))
        await store.write(batch(T0 + 2, 3.0))  # a new child
        assert child_of(store).pid != child.pid
        assert await stored(store) == [1.0, 3.0]
    finally:
        await store.close()


async def test_the_child_exits_when_the_store_closes(tmp_path: Path) -> None:
    store = SqliteTimeSeriesStore(tmp_path / "ts.db", SqliteSettings())
    await store.open()
    child = child_of(store)
    await store.close()
    assert child.returncode == 0


async def test_the_child_exits_when_its_parent_goes_away(tmp_path: Path) -> None:
    """kill -9 of the server closes the pipe: the child sees end of file and exits."""
    store = SqliteTimeSeriesStore(tmp_path / "ts.db", SqliteSettings())
    await store.open()
    child = child_of(store)
    assert child.stdin is not None
    child.stdin.close()  # what the kernel does for a parent that died
    async with asyncio.timeout(30):
        assert await child.wait() == 0
    await store.close()


async def test_a_value_the_store_cannot_hold_is_a_payload_error(tmp_path: Path) -> None:
    store = SqliteTimeSeriesStore(tmp_path / "ts.db", SqliteSettings())
    await store.open()
    try:
        with pytest.raises(PayloadError):
            await store.write([SeriesWrite("dev-1", [TsRecord(2**70, {"t": 1.0})])])
        await store.write(batch(T0, 1.0))  # the writer is still there
        assert await stored(store) == [1.0]
    finally:
        await store.close()
