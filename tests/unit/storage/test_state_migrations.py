"""The SQLite state store upgrades a data dir made by an older schema."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import msgspec
import pytest

from iotmesh.core.errors import NotFound, StorageError
from iotmesh.core.types import (
    AttributeScope,
    BasicCredentials,
    DeviceActivity,
    RpcRecord,
    RpcStatus,
)
from iotmesh.storage.sqlite.state import MIGRATIONS, SqliteStateStore


def _old_database(path: Path, version: int) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    for number, script in enumerate(MIGRATIONS[:version], start=1):
        conn.executescript(f"BEGIN; {script}; PRAGMA user_version = {number}; COMMIT;")
    conn.execute(
        "INSERT INTO devices (id, name, type, label, created_ts)"
        " VALUES ('5f0e6f6a-3c53-4a56-9d1c-7d1d2b5a0001', 'old', 'default', NULL, 1)"
    )
    conn.execute(
        "INSERT INTO credentials (device_id, access_token)"
        " VALUES ('5f0e6f6a-3c53-4a56-9d1c-7d1d2b5a0001', 'old-token')"
    )
    conn.close()


async def test_schema_1_upgrades_and_keeps_devices(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    _old_database(path, 1)
    store = SqliteStateStore(path)
    await store.open()
    try:
        device = await store.device_by_token("old-token")
        assert device is not None
        assert device.name == "old"
        assert device.gateway is False
        assert device.gateway_id is None
        saved = await store.save_attributes(device.id, AttributeScope.CLIENT, {"fw": "1.0"}, 5)
        assert saved[0].version == 1
    finally:
        await store.close()
    (version,) = sqlite3.connect(path).execute("PRAGMA user_version").fetchone()
    assert version == len(MIGRATIONS)


async def test_schema_3_upgrades_to_basic_credentials(tmp_path: Path) -> None:
    """A data dir with X.509 credentials gains MQTT Basic credentials, keeping the rest."""
    path = tmp_path / "state.db"
    device_id = "5f0e6f6a-3c53-4a56-9d1c-7d1d2b5a0003"
    conn = sqlite3.connect(path, isolation_level=None)
    for number, script in enumerate(MIGRATIONS[:3], start=1):
        conn.executescript(f"BEGIN; {script}; PRAGMA user_version = {number}; COMMIT;")
    conn.execute(
        "INSERT INTO devices (id, name, type, label, created_ts)"
        f" VALUES ('{device_id}', 'v3', 'default', NULL, 1)"
    )
    conn.execute(f"INSERT INTO credentials VALUES ('{device_id}', 'v3-token', 'ab12')")
    conn.close()

    store = SqliteStateStore(path)
    await store.open()
    try:
        device = await store.device_by_certificate("ab12")
        assert device is not None
        assert (device.id, device.access_token) == (device_id, "v3-token")
        assert await store.get_basic_credentials(device_id) is None
        creds = BasicCredentials(client_id="c", username="u", password_hash="$scrypt$x")
        await store.set_basic_credentials(device_id, creds)
        found = await store.device_by_basic("c", "u")
        assert found is not None
        assert found[0].cert_fingerprint == "ab12"
        assert found[1] == creds
        assert await store.device_by_basic(None, "u") is None
        assert await store.delete_device(device_id)
        assert await store.device_by_basic("c", "u") is None  # cascaded
    finally:
        await store.close()
    (version,) = sqlite3.connect(path).execute("PRAGMA user_version").fetchone()
    assert version == len(MIGRATIONS)


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    sqlite3.connect(path).execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    store = SqliteStateStore(path)
    with pytest.raises(StorageError, match="newer than this release"):
        await store.open()
    await store.close()


async def test_schema_4_upgrades_to_rpc_requests(tmp_path: Path) -> None:
    """A data dir from before stored RPC keeps its devices and gains the RPC tables (and
    the RPC housekeeping job's index and fences)."""
    path = tmp_path / "state.db"
    _old_database(path, 4)
    device_id = "5f0e6f6a-3c53-4a56-9d1c-7d1d2b5a0001"
    store = SqliteStateStore(path)
    await store.open()
    try:
        device = await store.device_by_token("old-token")
        assert device is not None
        assert device.id == device_id
        assert await store.open_rpcs() == []
        draft = RpcRecord(device_id, 0, "m", {"a": 1}, False, True, RpcStatus.QUEUED, 10, 1, 2)
        first = await store.create_rpc(draft)
        second = await store.create_rpc(draft)
        assert (first.id, second.id) == (1, 2)
        done = msgspec.structs.replace(
            first, status=RpcStatus.SUCCESSFUL, finished_ts=5, response=[1, "x"]
        )
        await store.update_rpcs([done])
        assert await store.get_rpc(device_id, 1) == done
        assert await store.open_rpcs() == [second]
        assert await store.due_rpcs(2, None, 10) == [second]
        records, total = await store.list_rpcs(device_id, [RpcStatus.SUCCESSFUL], 0, 10)
        assert (records, total) == ([done], 1)
        assert await store.purge_rpcs(6, 100, fencing_token=1) == 1
        with pytest.raises(NotFound):
            await store.create_rpc(msgspec.structs.replace(draft, device_id="nope"))
        seen = DeviceActivity(device_id, "mqtt", 3, 2, 1)
        await store.save_activity([seen, DeviceActivity("gone", None, 1, 0, 0)])
        assert await store.load_activity() == [seen]  # "gone" is no device: skipped
        assert await store.delete_device(device_id)
        assert await store.open_rpcs() == []  # cascaded
        assert await store.load_activity() == []
    finally:
        await store.close()
    (version,) = sqlite3.connect(path).execute("PRAGMA user_version").fetchone()
    assert version == len(MIGRATIONS) == 6
