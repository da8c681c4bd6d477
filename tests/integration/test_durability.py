"""Acknowledged means durable: crash, restart and back-pressure on a real server."""

from __future__ import annotations

import asyncio
import itertools
import threading
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.integration.server import RunningServer, start_server

T0 = 1_600_000_000_000


async def _post_until_stopped(
    url: str, token: str, worker: int, acked: list[int], stop: threading.Event, max_posts: int
) -> None:
    """Post 10-point batches with unique timestamps; record the acked ones."""
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        for n in range(max_posts):
            if stop.is_set():
                return
            base = T0 + (worker * max_posts + n) * 10
            payload = [{"ts": base + i, "values": {"v": base + i}} for i in range(10)]
            try:
                r = await client.post(f"/api/v1/{token}/telemetry", json=payload)
            except httpx.TransportError:
                return  # the server died under us: this batch was never acknowledged
            if r.status_code == 200:
                acked.extend(range(base, base + 10))


def _all_points(server: RunningServer, device_id: str) -> set[int]:
    with server.admin() as admin:
        data = admin.get(
            f"/api/v1/devices/{device_id}/telemetry",
            params={"keys": "v", "start_ts": T0, "end_ts": T0 + 10**9, "limit": 100_000},
        ).json()
    return {p["ts"] for p in data.get("v", [])}


def _register(server: RunningServer) -> dict[str, Any]:
    with server.admin() as admin:
        body: dict[str, Any] = admin.post("/api/v1/devices", json={"name": "crashy"}).json()
        return body


def _load(
    server: RunningServer, token: str, workers: int, max_posts: int, stop: threading.Event
) -> list[int]:
    acked: list[int] = []

    async def main() -> None:
        await asyncio.gather(
            *(
                _post_until_stopped(server.url, token, w, acked, stop, max_posts)
                for w in range(workers)
            )
        )

    asyncio.run(main())
    return acked


def test_kill_9_loses_no_acknowledged_point(server: RunningServer, tmp_path: Path) -> None:
    device = _register(server)
    stop = threading.Event()
    result: list[int] = []
    loader = threading.Thread(
        target=lambda: result.extend(_load(server, device["access_token"], 8, 400, stop))
    )
    loader.start()
    # Crash the server once a good number of batches were acknowledged, mid-load.
    for _ in itertools.count():
        if len(_all_points(server, device["id"])) >= 2000 or not loader.is_alive():
            break
    server.kill9()
    stop.set()
    loader.join(30)
    assert result, "no batch was acknowledged before the crash"

    restarted = start_server(server.data_dir, tmp_path / "logs2")
    try:
        stored = _all_points(restarted, device["id"])
    finally:
        restarted.stop()
    missing = set(result) - stored
    assert not missing, f"{len(missing)} acknowledged points lost, e.g. {sorted(missing)[:5]}"


def test_clean_restart_keeps_everything(server: RunningServer, tmp_path: Path) -> None:
    device = _register(server)
    acked = _load(server, device["access_token"], 4, 25, threading.Event())
    assert len(acked) == 4 * 25 * 10
    assert server.stop() == 0
    assert "stopped" in server.output()
    assert not (server.data_dir / "run.json").exists()
    restarted = start_server(server.data_dir, tmp_path / "logs2")
    try:
        assert _all_points(restarted, device["id"]) == set(acked)
        with restarted.admin() as admin:
            names = [d["name"] for d in admin.get("/api/v1/devices").json()["data"]]
        assert names == ["crashy"]
        assert restarted.admin_token == server.admin_token
    finally:
        restarted.stop()


@pytest.mark.slow
def test_slow_writer_pushes_back_without_loss(data_dir: Path, tmp_path: Path) -> None:
    slow = {
        "IOTMESH_WRITER__DELAY_MS": "150",
        "IOTMESH_WRITER__MAX_PENDING_RECORDS": "100",
        "IOTMESH_BUS__PARTITIONS": "2",
        "IOTMESH_BUS__PARTITION_QUEUE": "4",
        "IOTMESH_BUS__MAX_BATCH": "4",
        "IOTMESH_HTTP__ENQUEUE_TIMEOUT_S": "0.3",
    }
    server = start_server(data_dir, tmp_path / "logs", env=slow)
    try:
        device = _register(server)
        process = psutil.Process(server.pid)
        rss_before = process.memory_info().rss
        statuses: list[int] = []
        acked: list[int] = []

        async def one(client: httpx.AsyncClient, n: int) -> None:
            base = T0 + n * 10
            payload = [{"ts": base + i, "values": {"v": i}} for i in range(10)]
            r = await client.post(f"/api/v1/{device['access_token']}/telemetry", json=payload)
            statuses.append(r.status_code)
            if r.status_code == 200:
                acked.extend(range(base, base + 10))
            else:
                assert r.status_code == 503, r.text
                assert r.headers["retry-after"]
                assert r.headers["content-type"] == "application/problem+json"

        async def burst() -> None:
            limits = httpx.Limits(max_connections=200)
            async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as c:
                await asyncio.gather(*(one(c, n) for n in range(300)))

        asyncio.run(burst())
        rss_after = process.memory_info().rss
        assert 503 in statuses, "the overloaded server never pushed back"
        assert 200 in statuses
        assert rss_after - rss_before < 100 * 2**20
        assert set(acked) <= _all_points(server, device["id"])
        with server.anonymous() as client:
            assert client.get("/healthz").status_code == 200
    finally:
        server.stop()
