"""`iotmesh run` with telemetry and state on PostgreSQL, and `iotmesh doctor`, against
the local server (a database per session, a schema per test: tests/postgres.py)."""

from __future__ import annotations

import subprocess
import threading
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.influxd import free_port
from tests.integration.server import child_env, iotmesh_command, start_server
from tests.postgres import PgServer

T0 = 1_700_000_040_000  # a whole minute


def _pg_args(url: str, schema: str) -> list[str]:
    return [
        "--storage",
        "postgres",
        "--state",
        "postgres",
        "--postgres-url",
        url,
        "--postgres-schema",
        schema,
    ]


def _schema() -> str:
    return f"it_{uuid.uuid4().hex[:12]}"


def _telemetry(admin: httpx.Client, device_id: str, **params: Any) -> Any:
    r = admin.get(f"/api/v1/devices/{device_id}/telemetry", params=params)
    assert r.status_code == 200, r.text
    return r.json()


def test_both_stores_on_postgres_survive_a_restart(postgres: PgServer, tmp_path: Path) -> None:
    schema = _schema()
    args = _pg_args(postgres.url, schema)
    first = start_server(tmp_path / "data1", tmp_path / "logs1", *args)
    try:
        assert "PostgreSQL" in first.output()
        with first.admin() as admin, first.anonymous() as dev:
            r = admin.post("/api/v1/devices", json={"name": "pg-sensor"})
            assert r.status_code == 201, r.text
            device = r.json()
            token, dev_id = device["access_token"], device["id"]
            payload = [
                {"ts": T0 + i * 10_000, "values": {"temp": 20 + i, "mode": "eco"}}
                for i in range(12)
            ]
            assert dev.post(f"/api/v1/{token}/telemetry", json=payload).status_code == 200
            r = admin.post(f"/api/v1/devices/{dev_id}/attributes", json={"target": 21.5})
            assert r.status_code == 200, r.text
            window = {"start_ts": T0, "end_ts": T0 + 10**6, "order": "ASC"}
            raw = _telemetry(admin, dev_id, keys="temp,mode", **window)
            assert [p["value"] for p in raw["temp"]] == list(range(20, 32))
            assert raw["mode"][0] == {"ts": T0, "value": "eco"}
            avg = _telemetry(admin, dev_id, keys="temp", agg="AVG", interval_ms=60_000, **window)
            assert avg["temp"] == [{"ts": T0, "value": 22.5}, {"ts": T0 + 60_000, "value": 28.5}]
    finally:
        assert first.stop() == 0
    # Nothing of it was in the data dir: a fresh one, the same schema, and all is there.
    assert not (tmp_path / "data1" / "state.db").exists()
    assert not (tmp_path / "data1" / "timeseries.db").exists()
    second = start_server(tmp_path / "data2", tmp_path / "logs2", *args)
    try:
        with second.admin() as admin, second.anonymous() as dev:
            found = admin.get(f"/api/v1/devices/{dev_id}")
            assert found.status_code == 200, found.text
            assert found.json()["name"] == "pg-sensor"
            raw = _telemetry(admin, dev_id, keys="temp", start_ts=T0, end_ts=T0 + 10**6)
            assert len(raw["temp"]) == 12
            keys = admin.get(f"/api/v1/devices/{dev_id}/telemetry/keys").json()
            assert keys == ["mode", "temp"]
            attrs = admin.get(f"/api/v1/devices/{dev_id}/attributes").json()
            assert [(a["key"], a["value"], a["version"]) for a in attrs] == [("target", 21.5, 1)]
            # The device's token still works, and the data written now joins the old.
            url = f"/api/v1/{token}/telemetry"
            assert dev.post(url, json={"ts": T0 + 999, "values": {"temp": 99}}).status_code == 200
            # A key PostgreSQL cannot hold (NUL) is refused, that upload alone.
            refused = dev.post(url, json={"ts": T0 + 5, "values": {"a\x00b": 1}})
            assert refused.status_code == 422, refused.text
            latest = _telemetry(admin, dev_id, keys="temp", limit=1)
            assert latest["temp"] == [{"ts": T0 + 110_000, "value": 31}]
            assert admin.delete(f"/api/v1/devices/{dev_id}").status_code in (200, 204)
            assert admin.get(f"/api/v1/devices/{dev_id}").status_code == 404
    finally:
        assert second.stop() == 0


def _doctor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        iotmesh_command("doctor", *args),
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=60,
    )


def test_doctor_reports_postgres_and_schema_versions(postgres: PgServer, tmp_path: Path) -> None:
    schema = _schema()
    args = ["--data-dir", str(tmp_path / "data"), *_pg_args(postgres.url, schema)]
    before = _doctor(*args)
    assert before.returncode == 0, before.stdout + before.stderr
    assert "state=postgres" in before.stdout
    assert "PostgreSQL 15" in before.stdout or "PostgreSQL 1" in before.stdout
    assert "TimescaleDB" in before.stdout
    assert "not created yet" in before.stdout

    srv = start_server(tmp_path / "data", tmp_path / "logs", *_pg_args(postgres.url, schema))
    srv.stop()
    after = _doctor(*args)
    assert after.returncode == 0, after.stdout
    assert "at state schema 3" in after.stdout  # devices, RPC, RPC deadline index + fences
    assert "at timeseries schema 4" in after.stdout  # rows, chunks, fences, rollups

    nobody = f"postgresql://postgres@127.0.0.1:{free_port()}/x"
    missing = _doctor("--data-dir", str(tmp_path), "--state", "postgres", "--postgres-url", nobody)
    assert missing.returncode == 1
    assert "FAIL  state" in missing.stdout
    assert "unreachable" in missing.stdout


def test_run_refuses_to_start_without_its_postgres(tmp_path: Path) -> None:
    nobody = f"postgresql://postgres@127.0.0.1:{free_port()}/x"
    with pytest.raises(RuntimeError, match=r"cannot start: .*cannot connect to PostgreSQL"):
        start_server(tmp_path / "data", tmp_path / "logs", *_pg_args(nobody, "s"))


def test_acknowledged_only_after_postgres_has_it(postgres: PgServer, tmp_path: Path) -> None:
    """PostgreSQL unreachable during ingest (its database refuses connections and the
    open ones are cut): an upload waits while the writer retries, is acknowledged once
    PostgreSQL is back and has the point, and the platform recovers without a restart."""
    outage = PgServer(postgres.admin_url, f"iotmesh_outage_{uuid.uuid4().hex[:12]}")
    postgres.admin(f'CREATE DATABASE "{outage.database}"')
    env = {"IOTMESH_WRITER__RETRY_BACKOFF_MAX_S": "0.2"}
    srv = start_server(tmp_path / "data", tmp_path / "logs", *_pg_args(outage.url, "s"), env=env)
    try:
        with srv.admin() as admin, srv.anonymous() as dev:
            device = admin.post("/api/v1/devices", json={"name": "patient"}).json()
            url = f"/api/v1/{device['access_token']}/telemetry"
            # The first upload also puts the token in the registry's cache.
            assert dev.post(url, json={"ts": T0, "values": {"t": 1}}).status_code == 200
        database = outage.database
        postgres.admin(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
        postgres.admin(
            f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{database}'"
        )
        result: dict[str, Any] = {}

        def upload() -> None:
            with srv.anonymous() as dev:
                r = dev.post(url, json={"ts": T0 + 1, "values": {"t": 2.5}})
                result["status"] = r.status_code

        thread = threading.Thread(target=upload, name="upload")
        thread.start()
        thread.join(2.0)
        assert thread.is_alive(), f"acknowledged while PostgreSQL was unreachable: {result}"
        postgres.admin(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
        thread.join(30.0)
        assert result.get("status") == 200
        assert "commit failed, retrying" in srv.output()
        with srv.admin() as admin:
            got = _telemetry(
                admin, device["id"], keys="t", start_ts=T0, end_ts=T0 + 10, order="ASC"
            )
            assert got == {"t": [{"ts": T0, "value": 1}, {"ts": T0 + 1, "value": 2.5}]}
    finally:
        srv.stop()
        postgres.admin(f'ALTER DATABASE "{outage.database}" ALLOW_CONNECTIONS true')
        outage.drop()
