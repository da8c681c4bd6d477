"""`iotmesh run --storage influxdb` and `iotmesh doctor` against a real influxd."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.influxd import InfluxServer, free_port
from tests.integration.server import RunningServer, child_env, iotmesh_command, start_server

T0 = 1_700_000_040_000  # a whole minute


def _influx_args(influx: InfluxServer, database: str) -> list[str]:
    return ["--storage", "influxdb", "--influx-url", influx.url, "--influx-database", database]


def _influx_query(influx: InfluxServer, database: str, q: str) -> list[list[Any]]:
    """Rows of a query run on InfluxDB directly (not through iotmesh)."""
    r = httpx.post(influx.url + "/query", data={"db": database, "q": q, "epoch": "ms"}, timeout=10)
    r.raise_for_status()
    series = r.json()["results"][0].get("series", [])
    return [row for s in series for row in s["values"]]


@pytest.fixture
def influx_server(
    influxd: InfluxServer, data_dir: Path, tmp_path: Path
) -> Iterator[tuple[RunningServer, str]]:
    database = f"it_{time.monotonic_ns()}"
    srv = start_server(data_dir, tmp_path / "logs", *_influx_args(influxd, database))
    try:
        yield srv, database
    finally:
        srv.stop()


def _device(admin: httpx.Client, name: str) -> dict[str, Any]:
    r = admin.post("/api/v1/devices", json={"name": name})
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


def test_http_telemetry_lands_in_influxdb_and_reads_back(
    influx_server: tuple[RunningServer, str], influxd: InfluxServer
) -> None:
    server, database = influx_server
    assert "InfluxDB" in server.output()
    with server.admin() as admin, server.anonymous() as dev:
        device = _device(admin, "influx-sensor")
        token, dev_id = device["access_token"], device["id"]
        payload = [
            {"ts": T0 + i * 10_000, "values": {"temp": 20 + i, "mode": "eco", "on": i % 2 == 0}}
            for i in range(12)
        ]
        assert dev.post(f"/api/v1/{token}/telemetry", json=payload).status_code == 200
        assert dev.post(f"/api/v1/{token}/telemetry", json={"cfg": {"a": [1]}}).status_code == 200

        # The 200 meant "written": the points are in InfluxDB already.
        rows = _influx_query(
            influxd,
            database,
            f"SELECT kind, v_l FROM telemetry WHERE entity = '{dev_id}' AND \"key\" = 'temp'",
        )
        assert [(ts, v) for ts, _, v in rows] == [(T0 + i * 10_000, 20 + i) for i in range(12)]

        raw = admin.get(
            f"/api/v1/devices/{dev_id}/telemetry",
            params={"keys": "temp,mode,on", "order": "ASC", "start_ts": T0, "end_ts": T0 + 10**6},
        ).json()
        assert [p["value"] for p in raw["temp"]] == list(range(20, 32))
        assert raw["mode"][0] == {"ts": T0, "value": "eco"}
        assert raw["on"][1] == {"ts": T0 + 10_000, "value": False}

        avg = admin.get(
            f"/api/v1/devices/{dev_id}/telemetry",
            params={
                "keys": "temp",
                "agg": "AVG",
                "interval_ms": 60_000,
                "order": "ASC",
                "start_ts": T0,
                "end_ts": T0 + 10**6,
            },
        ).json()
        assert avg["temp"] == [{"ts": T0, "value": 22.5}, {"ts": T0 + 60_000, "value": 28.5}]

        keys = admin.get(f"/api/v1/devices/{dev_id}/telemetry/keys").json()
        assert keys == ["cfg", "mode", "on", "temp"]

        assert admin.delete(f"/api/v1/devices/{dev_id}").status_code in (200, 204)
    assert (
        _influx_query(
            influxd, database, f"SELECT COUNT(kind) FROM telemetry WHERE entity = '{dev_id}'"
        )
        == []
    )


def test_a_timestamp_influxdb_cannot_hold_is_refused_alone(
    influx_server: tuple[RunningServer, str],
) -> None:
    server, _ = influx_server
    with server.admin() as admin, server.anonymous() as dev:
        device = _device(admin, "time-traveller")
        url = f"/api/v1/{device['access_token']}/telemetry"
        r = dev.post(url, json={"ts": 10**13, "values": {"t": 1}})  # the year 2286
        assert r.status_code == 422, r.text
        assert "outside what InfluxDB stores" in r.json()["detail"]
        assert dev.post(url, json={"ts": T0, "values": {"t": 2}}).status_code == 200
        got = admin.get(
            f"/api/v1/devices/{device['id']}/telemetry", params={"keys": "t", "end_ts": 2 * 10**13}
        ).json()
        assert got == {"t": [{"ts": T0, "value": 2}]}


def test_acknowledged_only_after_influxdb_has_it(data_dir: Path, tmp_path: Path) -> None:
    """With InfluxDB down, an upload waits (the writer retries); it is acknowledged once
    InfluxDB is back and has the points, and nothing is lost."""
    influx = InfluxServer.start(tmp_path / "influxd")
    env = {"IOTMESH_WRITER__RETRY_BACKOFF_MAX_S": "0.2"}
    srv = start_server(data_dir, tmp_path / "logs", *_influx_args(influx, "acks"), env=env)
    try:
        with srv.admin() as admin:
            device = _device(admin, "patient")
        influx.stop()
        result: dict[str, Any] = {}

        def upload() -> None:
            with srv.anonymous() as dev:
                url = f"/api/v1/{device['access_token']}/telemetry"
                r = dev.post(url, json={"ts": T0, "values": {"t": 1.5}})
                result["status"] = r.status_code
                result["at"] = time.monotonic()

        thread = threading.Thread(target=upload, name="upload")
        thread.start()
        thread.join(2.0)
        assert thread.is_alive(), f"acknowledged while InfluxDB was down: {result}"
        influx.launch()
        thread.join(30.0)
        assert result.get("status") == 200
        rows = _influx_query(influx, "acks", "SELECT kind, v_d FROM telemetry")
        assert [(ts, v) for ts, _, v in rows] == [(T0, 1.5)]
        assert "commit failed, retrying" in srv.output()
    finally:
        srv.stop()
        influx.stop()


def _doctor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        iotmesh_command("doctor", *args),
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=60,
    )


def test_doctor_reports_influxdb(influxd: InfluxServer, tmp_path: Path) -> None:
    found = _doctor(
        "--data-dir", str(tmp_path), "--storage", "influxdb", "--influx-url", influxd.url
    )
    assert found.returncode == 0, found.stdout + found.stderr
    assert "InfluxDB 1." in found.stdout
    assert "timeseries=influxdb" in found.stdout

    nobody = f"http://127.0.0.1:{free_port()}"
    missing = _doctor("--data-dir", str(tmp_path), "--storage", "influxdb", "--influx-url", nobody)
    assert missing.returncode == 1
    assert "FAIL  timeseries" in missing.stdout
    assert "unreachable" in missing.stdout


def test_doctor_on_defaults_checks_the_data_dir(tmp_path: Path) -> None:
    found = _doctor("--data-dir", str(tmp_path))
    assert found.returncode == 0, found.stdout + found.stderr
    assert "timeseries=sqlite" in found.stdout
    assert "SQLite" in found.stdout


def test_a_dropped_database_is_created_again(
    influx_server: tuple[RunningServer, str], influxd: InfluxServer
) -> None:
    server, database = influx_server
    with server.admin() as admin, server.anonymous() as dev:
        device = _device(admin, "survivor")
        url = f"/api/v1/{device['access_token']}/telemetry"
        assert dev.post(url, json={"ts": T0, "values": {"t": 1}}).status_code == 200
        r = httpx.post(influxd.url + "/query", data={"q": f'DROP DATABASE "{database}"'})
        r.raise_for_status()
        assert dev.post(url, json={"ts": T0 + 1, "values": {"t": 2}}).status_code == 200
    rows = _influx_query(influxd, database, "SELECT kind, v_l FROM telemetry")
    assert [(ts, v) for ts, _, v in rows] == [(T0 + 1, 2)]


def test_run_refuses_to_start_without_its_influxdb(data_dir: Path, tmp_path: Path) -> None:
    nobody = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(RuntimeError, match=r"cannot start: InfluxDB at .* unreachable"):
        start_server(data_dir, tmp_path / "logs", "--storage", "influxdb", "--influx-url", nobody)


def test_influxdb_with_credentials(data_dir: Path, tmp_path: Path) -> None:
    """auth-enabled influxd: the password from the environment works, a wrong one is
    reported by doctor and stops run from starting."""
    influx = InfluxServer.start(tmp_path / "influxd", auth=True)
    try:
        q = "CREATE USER iot WITH PASSWORD 's3cret' WITH ALL PRIVILEGES"
        httpx.post(influx.url + "/query", data={"q": q}, timeout=10).raise_for_status()
        args = [*_influx_args(influx, "secured"), "--influx-username", "iot"]
        good = {"IOTMESH_STORAGE__INFLUXDB__PASSWORD": "s3cret"}
        bad = {"IOTMESH_STORAGE__INFLUXDB__PASSWORD": "wrong"}

        checked = subprocess.run(
            iotmesh_command("doctor", "--data-dir", str(data_dir), *args),
            capture_output=True,
            text=True,
            env=child_env(bad),
            timeout=60,
        )
        assert checked.returncode == 1
        assert "refused the credentials (401)" in checked.stdout
        with pytest.raises(RuntimeError, match="refused the credentials"):
            start_server(data_dir, tmp_path / "logs-bad", *args, env=bad)

        srv = start_server(data_dir, tmp_path / "logs", *args, env=good)
        try:
            with srv.admin() as admin, srv.anonymous() as dev:
                device = _device(admin, "guarded")
                url = f"/api/v1/{device['access_token']}/telemetry"
                assert dev.post(url, json={"ts": T0, "values": {"t": 7}}).status_code == 200
                got = admin.get(f"/api/v1/devices/{device['id']}/telemetry", params={"keys": "t"})
                assert got.json() == {"t": [{"ts": T0, "value": 7}]}
        finally:
            srv.stop()
    finally:
        influx.stop()
