"""A data dir written by the previous release (848374b) opens and upgrades.

`tests/fixtures/datadir-848374b/` was made by that release's own `iotmesh run`
(`tests/fixtures/make_datadir_848374b.py`; its README says how). Each test copies it to
a tmp dir and starts THIS release's `iotmesh run` on the copy, then checks through the
public interfaces (REST, the device HTTP API, paho-mqtt) that everything the old
release stored is there and works, and in the files that the schemas were migrated.
"""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from iotmesh.storage.sqlite import schema as ts_schema
from iotmesh.storage.sqlite import sessions as sessions_schema
from iotmesh.storage.sqlite import state as state_schema
from tests.fixtures.datadir_848374b import (
    FILES,
    FIXTURE_DIR,
    HOURS,
    MQTT_ENV,
    POINTS,
    RETAINED_PAYLOAD,
    RETAINED_TOPIC,
    SESSION_CLIENT_ID,
    SHARED_QUEUED,
    T0,
    Dev,
    Device,
    point_values,
    ts_of,
)
from tests.integration.mqtt_helpers import V311, PahoClient, device_client, wait_until
from tests.integration.server import RunningServer, start_server

HOUR_MS = 3_600_000
END = T0 + HOURS * HOUR_MS
# The schema versions release 848374b wrote (PRAGMA user_version of each file).
OLD_VERSIONS = {"state.db": 4, "timeseries.db": 1, "mqtt-sessions.sqlite": 2}
NEW_VERSIONS = {
    "state.db": len(state_schema.MIGRATIONS),
    "timeseries.db": len(ts_schema.MIGRATIONS),
    "mqtt-sessions.sqlite": len(sessions_schema.MIGRATIONS),
}


def copy_fixture(into: Path) -> Path:
    data = into / "data"
    data.mkdir()
    for name in FILES:
        shutil.copy2(FIXTURE_DIR / name, data / name)
    return data


def user_versions(data: Path) -> dict[str, int]:
    versions = {}
    for name in OLD_VERSIONS:
        db = sqlite3.connect(data / name)
        try:
            (versions[name],) = db.execute("PRAGMA user_version").fetchone()
        finally:
            db.close()
    return versions


def schema_of(data: Path) -> dict[str, list[tuple[str, str, str | None]]]:
    """Every file's tables, indexes and triggers with their SQL."""
    out = {}
    for name in OLD_VERSIONS:
        db = sqlite3.connect(data / name)
        try:
            out[name] = db.execute(
                "SELECT type, name, sql FROM sqlite_master ORDER BY type, name"
            ).fetchall()
        finally:
            db.close()
    return out


def device_ids(admin: httpx.Client) -> dict[str, str]:
    r = admin.get("/api/v1/devices", params={"page_size": 100})
    assert r.status_code == 200, r.text
    return {d["name"]: d["id"] for d in r.json()["data"]}


@pytest.fixture(scope="module")
def upgraded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """This release's `iotmesh run` on a copy of the old data dir (shared by the module;
    the session test comes last as it takes the queued message)."""
    tmp = tmp_path_factory.mktemp("upgrade")
    data = copy_fixture(tmp)
    assert user_versions(data) == OLD_VERSIONS
    srv = start_server(data, tmp / "logs", env=MQTT_ENV)
    try:
        yield srv
    finally:
        assert srv.stop() == 0, srv.output()


@pytest.fixture(scope="module")
def admin(upgraded: RunningServer) -> Iterator[httpx.Client]:
    with upgraded.admin() as client:
        yield client


def test_schemas_were_migrated(upgraded: RunningServer) -> None:
    versions = user_versions(upgraded.data_dir)
    assert versions == NEW_VERSIONS
    assert versions["state.db"] > OLD_VERSIONS["state.db"]
    assert versions["timeseries.db"] > OLD_VERSIONS["timeseries.db"]
    tables = {n for _, n, _ in schema_of(upgraded.data_dir)["timeseries.db"]}
    assert {"ts_rollup", "ts_rollup_state", "ts_expired"} <= tables
    state_tables = {n for _, n, _ in schema_of(upgraded.data_dir)["state.db"]}
    assert {"rpc_requests", "device_activity"} <= state_tables


def test_admin_token_and_devices(upgraded: RunningServer, admin: httpx.Client) -> None:
    # The old admin token file is used, not replaced.
    assert upgraded.admin_token == (FIXTURE_DIR / "admin_token").read_text().strip()
    r = admin.get("/api/v1/devices", params={"page_size": 100})
    assert r.status_code == 200, r.text
    devices = {d["name"]: d for d in r.json()["data"]}
    assert set(devices) == {Dev.A.name, Dev.B.name}
    for dev in (Dev.A, Dev.B):
        assert devices[dev.name]["type"] == dev.type
        assert devices[dev.name]["access_token"] == dev.token
    r = admin.get(f"/api/v1/devices/{devices[Dev.B.name]['id']}/credentials")
    assert r.status_code == 200, r.text
    basic = [c for c in r.json() if c["type"] == "MQTT_BASIC"]
    assert [(c["client_id"], c["username"]) for c in basic] == [
        (Dev.B.basic_client_id, Dev.B.basic_username)
    ]


def test_devices_log_in_with_token_and_basic(upgraded: RunningServer) -> None:
    with upgraded.anonymous() as anon:
        r = anon.post(f"/api/v1/{Dev.A.token}/telemetry", json={"ts": END, "values": {"x": 1}})
        assert r.status_code == 200, r.text
        r = anon.post("/api/v1/not-a-token/telemetry", json={"x": 1})
        assert r.status_code == 401, r.text
    with device_client(upgraded.mqtt_port, Dev.A.token) as a:
        assert a.publish("v1/devices/me/telemetry", {"ts": END, "values": {"y": 2}}).value == 0
    # Basic credentials, under another client id (a clean session: B's persistent one
    # is for test_persistent_session_resumes).
    with PahoClient(upgraded.mqtt_port, client_id="other", version=V311) as wrong:
        wrong.paho.username_pw_set(Dev.B.basic_username, Dev.B.basic_password)
        assert wrong.connect().value != 0
    with PahoClient(upgraded.mqtt_port, client_id="x", version=V311) as bad:
        bad.paho.username_pw_set(Dev.B.basic_username, "wrong password")
        assert bad.connect().value != 0


@pytest.mark.parametrize("dev", [Dev.A, Dev.B], ids=["a", "b"])
def test_attributes_in_every_scope(admin: httpx.Client, dev: Device) -> None:
    device_id = device_ids(admin)[dev.name]
    shared = {**dev.shared_attrs, **(SHARED_QUEUED if dev is Dev.B else {})}
    for scope, expected in (
        ("SERVER", dev.server_attrs),
        ("SHARED", shared),
        ("CLIENT", dev.client_attrs),
    ):
        r = admin.get(f"/api/v1/devices/{device_id}/attributes", params={"scope": scope})
        assert r.status_code == 200, r.text
        assert {a["key"]: a["value"] for a in r.json()} == expected, scope


def raw(admin: httpx.Client, device_id: str, keys: str) -> dict[str, list[dict[str, Any]]]:
    r = admin.get(
        f"/api/v1/devices/{device_id}/telemetry",
        params={"keys": keys, "start_ts": T0, "end_ts": END - 1, "limit": 100_000, "order": "ASC"},
    )
    assert r.status_code == 200, r.text
    body: dict[str, list[dict[str, Any]]] = r.json()
    return body


@pytest.mark.parametrize("dev", [Dev.A, Dev.B], ids=["a", "b"])
def test_raw_telemetry(admin: httpx.Client, dev: Device) -> None:
    device_id = device_ids(admin)[dev.name]
    keys = ["temperature", "count", *dev.extra_keys]
    got = raw(admin, device_id, ",".join(keys))
    expected: dict[str, list[tuple[int, Any]]] = {k: [] for k in keys}
    for i in range(POINTS):
        for key, value in point_values(dev, i).items():
            expected[key].append((ts_of(i), value))
    for key in keys:
        assert [(p["ts"], p["value"]) for p in got[key]] == expected[key], key
    # Kinds are kept: a double stays a double, a long a long.
    assert isinstance(got["temperature"][0]["value"], float)
    assert isinstance(got["count"][1]["value"], int)
    r = admin.get(f"/api/v1/devices/{device_id}/telemetry/latest", params={"keys": "count"})
    assert r.status_code == 200, r.text
    assert r.json()["count"][0]["value"] == POINTS - 1


def rollup_rows(data: Path) -> int:
    db = sqlite3.connect(data / "timeseries.db", timeout=10)
    try:
        (n,) = db.execute("SELECT count(*) FROM ts_rollup").fetchone()
    finally:
        db.close()
    assert isinstance(n, int)
    return n


def test_aggregates_and_rollups_of_old_data(upgraded: RunningServer, admin: httpx.Client) -> None:
    # The old points get rolled up in the background after the start.
    wait_until(lambda: rollup_rows(upgraded.data_dir) > 0, "rollups of the old data", 60)
    device_id = device_ids(admin)[Dev.A.name]
    per_hour = POINTS // HOURS
    expected_avg = [
        sum(point_values(Dev.A, i)["temperature"] for i in range(h * per_hour, (h + 1) * per_hour))
        / per_hour
        for h in range(HOURS)
    ]
    for agg in ("AVG", "COUNT", "MAX"):
        r = admin.get(
            f"/api/v1/devices/{device_id}/telemetry",
            params={
                "keys": "temperature",
                "start_ts": T0,
                "end_ts": END - 1,
                "agg": agg,
                "interval_ms": HOUR_MS,
                "limit": 100,
                "order": "ASC",
            },
        )
        assert r.status_code == 200, r.text
        values = [p["value"] for p in r.json()["temperature"]]
        if agg == "AVG":
            assert values == pytest.approx(expected_avg)
        elif agg == "COUNT":
            assert values == [per_hour] * HOURS
        else:
            assert (
                values == [max(point_values(Dev.A, i)["temperature"] for i in range(100))] * HOURS
            )


def test_retained_message(upgraded: RunningServer) -> None:
    with device_client(upgraded.mqtt_port, Dev.A.token) as sub:
        sub.subscribed("fixture/#", qos=1)
        message = sub.expect(RETAINED_TOPIC)
    assert message.payload == RETAINED_PAYLOAD
    assert message.retain


def test_persistent_session_resumes(upgraded: RunningServer) -> None:
    """B's session (clean session 0, subscribed to attribute changes) comes back with
    the change queued for it while it was away, and the subscription still works."""
    with PahoClient(
        upgraded.mqtt_port, client_id=SESSION_CLIENT_ID, version=V311, clean_session=False
    ) as session:
        session.paho.username_pw_set(Dev.B.basic_username, Dev.B.basic_password)
        assert session.connect().value == 0
        assert session.session_present
        assert session.expect_json("v1/devices/me/attributes") == SHARED_QUEUED
        with upgraded.admin() as admin:
            device_id = device_ids(admin)[Dev.B.name]
            r = admin.post(
                f"/api/v1/devices/{device_id}/attributes",
                params={"scope": "SHARED"},
                json={"interval_s": 60},
            )
            assert r.status_code == 200, r.text
        assert session.expect_json("v1/devices/me/attributes") == {"interval_s": 60}


def test_second_start_is_a_no_op(tmp_path: Path) -> None:
    data = copy_fixture(tmp_path)
    first = start_server(data, tmp_path / "logs1", env=MQTT_ENV)
    assert first.stop() == 0, first.output()
    after_first = schema_of(data)
    assert user_versions(data) == NEW_VERSIONS
    second = start_server(data, tmp_path / "logs2", env=MQTT_ENV)
    try:
        assert user_versions(data) == NEW_VERSIONS
        assert schema_of(data) == after_first
        with second.admin() as admin:
            ids = device_ids(admin)
            assert set(ids) == {Dev.A.name, Dev.B.name}
            got = raw(admin, ids[Dev.B.name], "count")
            assert [p["value"] for p in got["count"]] == list(range(POINTS))
    finally:
        assert second.stop() == 0, second.output()
