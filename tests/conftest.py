"""Fixtures shared by the test folders: real servers the suites run against."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.influxd import InfluxServer
from tests.postgres import PgServer

# the `redis_hot` fixture; `fake_kubernetes`, a fake API server (no cluster runs here)
pytest_plugins = ["tests.redis_hot", "tests.k8s_fake"]


@pytest.fixture(scope="session")
def influxd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InfluxServer]:
    """One real influxd for the session, started on first use; tests use own databases."""
    server = InfluxServer.start(tmp_path_factory.mktemp("influxd"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PgServer]:
    """A database of this session on the local PostgreSQL server, dropped at the end."""
    server = PgServer.create()
    try:
        yield server
    finally:
        server.drop()
