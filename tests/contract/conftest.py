"""The `store` fixture: one TimeSeriesStore per backend, fresh for each test; the
`state` fixture: one StateStore per backend, likewise.

To add a backend, append a `Backend` to `BACKENDS`: a name (the pytest id), a factory
building an unopened store from a tmp dir, and `settle`, which waits until background
work (compaction, rollups) has finished so tests can check it changes no answer. A
backend that needs a server names its session fixture in `server`; `make` then takes
the server first and the `backend` fixture binds it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from iotmesh.core.settings import InfluxSettings, SqliteSettings
from iotmesh.storage.influx import InfluxTimeSeriesStore
from iotmesh.storage.postgres import PostgresStateStore, PostgresTimeSeriesStore
from iotmesh.storage.sqlite.state import SqliteStateStore
from iotmesh.storage.sqlite.tsdb import SqliteTimeSeriesStore
from iotmesh.storage.state import StateStore
from iotmesh.storage.timeseries import TimeSeriesStore
from tests.influxd import InfluxServer
from tests.postgres import PgServer


@dataclass(frozen=True)
class Backend:
    """How the contract suite builds and settles one backend."""

    name: str
    make: Callable[..., TimeSeriesStore]
    settle: Callable[[TimeSeriesStore], Awaitable[None]]
    server: str | None = None


async def no_background_work(store: TimeSeriesStore) -> None:
    """`settle` of a backend that does nothing in the background."""


async def _sqlite_settle(store: TimeSeriesStore) -> None:
    assert isinstance(store, SqliteTimeSeriesStore)
    await store.compact()


def _sqlite(tmp_path: Path) -> TimeSeriesStore:
    # Small chunks and an early compaction, so a test's few points exercise both.
    # Rollup levels that the suite's intervals (10, 25, a minute, random) read.
    settings = SqliteSettings(chunk_max_points=16, compact_min_chunks=3)
    return SqliteTimeSeriesStore(tmp_path / "timeseries.db", settings, (5, 10, 60_000))


async def _influxdb_settle(store: TimeSeriesStore) -> None:
    assert isinstance(store, InfluxTimeSeriesStore)
    await store.roll_up()


def _influxdb(server: InfluxServer, tmp_path: Path) -> TimeSeriesStore:
    # A database per test, named after its tmp dir: the same on a reopen in one test.
    # The SQLite backend's rollup levels, so the suite's queries read rollups here too;
    # no marker lag (nothing else writes), so a retention pass never waits for one.
    database = "contract_" + hashlib.sha1(str(tmp_path).encode()).hexdigest()[:16]
    settings = InfluxSettings(url=server.url, database=database)
    return InfluxTimeSeriesStore(settings, levels=(5, 10, 60_000), rollup_lag_s=0)


async def _postgres_settle(store: TimeSeriesStore) -> None:
    # Every point into chunks (the background task leaves the newest block as rows).
    assert isinstance(store, PostgresTimeSeriesStore)
    await store.compact(everything=True)


def _postgres(server: PgServer, tmp_path: Path) -> TimeSeriesStore:
    # A schema per test, named after its tmp dir: the same on a reopen in one test.
    # Daily partitions, so the tests' timestamps (1970 and 2023) span a few of them;
    # the SQLite store's rollup levels.
    settings = server.settings(str(tmp_path), partition_interval_s=86400)
    return PostgresTimeSeriesStore(settings, (5, 10, 60_000))


BACKENDS = [
    Backend("sqlite", _sqlite, _sqlite_settle),
    Backend("influxdb", _influxdb, _influxdb_settle, server="influxd"),
    Backend("postgres", _postgres, _postgres_settle, server="postgres"),
]


@pytest.fixture(params=BACKENDS, ids=lambda b: b.name)
def backend(request: pytest.FixtureRequest) -> Backend:
    """The backend under test."""
    b: Backend = request.param
    if b.server is not None:
        server: Any = request.getfixturevalue(b.server)
        b = dataclasses.replace(b, make=functools.partial(b.make, server))
    return b


@pytest.fixture
async def store(backend: Backend, tmp_path: Path) -> AsyncIterator[TimeSeriesStore]:
    """An opened, empty store; closed after the test."""
    s = backend.make(tmp_path)
    await s.open()
    try:
        yield s
    finally:
        await s.close()


# -- the state store -------------------------------------------------------------------


@dataclass(frozen=True)
class StateBackend:
    """How the state-store contract suite builds one backend (see `Backend`)."""

    name: str
    make: Callable[..., StateStore]
    server: str | None = None


def _sqlite_state(tmp_path: Path) -> StateStore:
    return SqliteStateStore(tmp_path / "state.db", synchronous="OFF")


def _postgres_state(server: PgServer, tmp_path: Path) -> StateStore:
    return PostgresStateStore(server.settings(str(tmp_path)))


STATE_BACKENDS = [
    StateBackend("sqlite", _sqlite_state),
    StateBackend("postgres", _postgres_state, server="postgres"),
]


@pytest.fixture(params=STATE_BACKENDS, ids=lambda b: b.name)
def state_backend(request: pytest.FixtureRequest) -> StateBackend:
    """The state-store backend under test."""
    b: StateBackend = request.param
    if b.server is not None:
        server: Any = request.getfixturevalue(b.server)
        b = dataclasses.replace(b, make=functools.partial(b.make, server))
    return b


@pytest.fixture
async def state(state_backend: StateBackend, tmp_path: Path) -> AsyncIterator[StateStore]:
    """An opened, empty state store; closed after the test."""
    s = state_backend.make(tmp_path)
    await s.open()
    try:
        yield s
    finally:
        await s.close()
