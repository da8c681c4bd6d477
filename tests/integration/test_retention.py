"""Retention end to end: `iotmesh run` expires raw points by device type at start-up,
and hourly averages of the expired range still answer, from the rollups."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from tests.integration.server import start_server

HOUR = 3_600_000


def test_raw_points_expire_and_rollups_keep_answering(data_dir: Path, tmp_path: Path) -> None:
    now = int(time.time() * 1000)
    old = now - 3 * 24 * HOUR - now % HOUR  # three days ago, on the hour
    srv = start_server(data_dir, tmp_path / "logs1")
    try:
        with srv.admin() as admin:
            r = admin.post(
                "/api/v1/devices", json={"name": "probe", "type": "lab", "access_token": "tk"}
            )
            assert r.status_code == 201, r.text
            device_id = r.json()["id"]
        payload = [{"ts": old + i * 60_000, "values": {"t": i / 4}} for i in range(180)]
        payload.append({"ts": now, "values": {"t": 1.5}})
        with httpx.Client(base_url=srv.url) as dev:
            assert dev.post("/api/v1/tk/telemetry", json=payload).status_code == 200
        with srv.admin() as admin:
            hourly = {"keys": "t", "start_ts": old, "end_ts": now, "agg": "AVG"}
            hourly |= {"interval_ms": HOUR, "order": "ASC"}
            before = admin.get(f"/api/v1/devices/{device_id}/telemetry", params=hourly).json()
        assert [p["ts"] for p in before["t"][:3]] == [old, old + HOUR, old + 2 * HOUR]
    finally:
        srv.stop()

    env = {"IOTMESH_STORAGE__RETENTION__DEVICE_TYPES": '{"lab": 86400}'}
    srv = start_server(data_dir, tmp_path / "logs2", env=env)
    try:
        raw = {"keys": "t", "start_ts": 0, "end_ts": now, "limit": 1000, "order": "ASC"}
        with srv.admin() as admin:
            path = f"/api/v1/devices/{device_id}/telemetry"
            deadline = time.monotonic() + 30
            while True:
                points = admin.get(path, params=raw).json()["t"]
                if len(points) == 1 or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert points == [{"ts": now, "value": 1.5}]  # only the recent point is left
            assert admin.get(path, params=hourly).json() == before
    finally:
        srv.stop()
