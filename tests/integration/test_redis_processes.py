"""Two `iotmesh run` processes sharing PostgreSQL (telemetry and state) and the local
Redis (all hot state): what a device does through one is what users see through the
other — latest values, attributes, connectivity — and an RPC request made on one
reaches the device's long-poll on the other."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import redis.asyncio as aioredis

from tests.integration.server import start_server
from tests.postgres import PgServer
from tests.redis_hot import REDIS_URL


def _until(read: Callable[[], Any], check: Callable[[Any], bool]) -> Any:
    deadline = time.monotonic() + 10
    while not check(value := read()):
        assert time.monotonic() < deadline, f"still {value!r}"
        time.sleep(0.05)
    return value


async def _delete(pattern: str) -> None:
    r = aioredis.Redis.from_url(REDIS_URL)
    try:
        keys = [k async for k in r.scan_iter(match=pattern)]
        if keys:
            await r.delete(*keys)
    finally:
        await r.aclose()


def test_two_processes_show_one_device(tmp_path: Path, postgres: PgServer) -> None:
    ns = f"procs{uuid.uuid4().hex[:8]}"
    args = [
        *("--storage", "postgres", "--state", "postgres"),
        *("--postgres-url", postgres.url, "--postgres-schema", f"it_{uuid.uuid4().hex[:12]}"),
    ]
    env = {
        "IOTMESH_STORAGE__LATEST": "redis",
        "IOTMESH_STORAGE__REDIS__URL": REDIS_URL,
        "IOTMESH_STORAGE__REDIS__NAMESPACE": ns,
        "IOTMESH_STORAGE__REDIS__CONNECTIVITY": "true",
        "IOTMESH_STORAGE__REDIS__CONNECTIVITY_FLUSH_S": "0.2",
        "IOTMESH_STORAGE__REDIS__ATTRIBUTE_CACHE": "true",
        "IOTMESH_STORAGE__REDIS__RPC_WAKEUPS": "true",
    }
    users = start_server(tmp_path / "users", tmp_path / "logs-users", *args, env=env)
    try:
        devices = start_server(tmp_path / "devices", tmp_path / "logs-devices", *args, env=env)
        try:
            with users.admin() as admin, devices.anonymous() as dev:
                _check(admin, dev)
        finally:
            devices.stop()
    finally:
        users.stop()
        asyncio.run(_delete(f"{ns}:*"))


def _check(admin: httpx.Client, dev: httpx.Client) -> None:
    device = admin.post("/api/v1/devices", json={"name": "valve"}).json()
    api, rest = f"/api/v1/{device['access_token']}", f"/api/v1/devices/{device['id']}"

    # Latest values: the users' process caches them; the devices' process commits newer.
    assert dev.post(f"{api}/telemetry", json={"ts": 1, "values": {"t": 1}}).status_code == 200
    assert admin.get(f"{rest}/telemetry/latest").json() == {"t": [{"ts": 1, "value": 1}]}
    assert dev.post(f"{api}/telemetry", json={"ts": 2, "values": {"t": 2}}).status_code == 200
    assert admin.get(f"{rest}/telemetry/latest").json() == {"t": [{"ts": 2, "value": 2}]}

    # Attributes: cached by the users' process, changed through the devices' one.
    assert dev.post(f"{api}/attributes", json={"fw": "1.0"}).status_code == 200
    assert admin.get(f"{rest}/twin").json()["reported"]["fw"]["value"] == "1.0"
    assert dev.post(f"{api}/attributes", json={"fw": "1.1"}).status_code == 200
    assert admin.get(f"{rest}/twin").json()["reported"]["fw"]["value"] == "1.1"

    # RPC: the device long-polls the devices' process; a user asks the users' process.
    polled: list[httpx.Response] = []
    poll = threading.Thread(
        target=lambda: polled.append(dev.get(f"{api}/rpc", params={"timeout": 20000}))
    )
    poll.start()
    try:
        connectivity = _until(
            lambda: admin.get(f"{rest}/connectivity").json(), lambda c: c["sessions"] == 1
        )
        assert (connectivity["online"], connectivity["transport"]) == (True, "http")
        body = {"method": "open", "params": {"pct": 40}, "persistent": True}
        rpc_id = admin.post(f"{rest}/rpc", json=body).json()["rpcId"]
    finally:
        poll.join(30)
    assert polled[0].json() == {"id": rpc_id, "method": "open", "params": {"pct": 40}}
    assert dev.post(f"{api}/rpc/{rpc_id}", json={"done": True}).status_code == 200
    record = _until(
        lambda: admin.get(f"{rest}/rpc/{rpc_id}").json(), lambda r: r["status"] == "SUCCESSFUL"
    )
    assert record["response"] == {"done": True}
    _until(lambda: admin.get(f"{rest}/connectivity").json(), lambda c: c["sessions"] == 0)
