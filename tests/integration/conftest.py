"""Fixtures: a real `iotmesh run` per test (or per module), stopped by its PID."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.server import RunningServer, start_server

_names = itertools.count()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path


@pytest.fixture
def server(data_dir: Path, tmp_path: Path) -> Iterator[RunningServer]:
    """A fresh server with an empty data dir."""
    srv = start_server(data_dir, tmp_path / "logs")
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def admin(server: RunningServer) -> Iterator[httpx.Client]:
    with server.admin() as client:
        yield client


@pytest.fixture
def device(admin: httpx.Client) -> dict[str, Any]:
    """A newly registered device (JSON as the API returns it)."""
    r = admin.post("/api/v1/devices", json={"name": f"sensor-{next(_names)}"})
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


@pytest.fixture
def rest(srv: RunningServer) -> Iterator[httpx.Client]:
    """An admin REST client of the module's shared server `srv`."""
    with srv.admin() as client:
        yield client
