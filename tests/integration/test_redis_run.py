"""`iotmesh run` with every kind of hot state in the local Redis: the REST and device
APIs behave as with memory (latest values, attributes, connectivity, persistent RPC
over an HTTP long-poll), and the state is in Redis under the namespace."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from pathlib import Path

import httpx
import redis.asyncio as aioredis

from tests.integration.server import start_server
from tests.redis_hot import REDIS_URL


async def _keys(pattern: str) -> list[bytes]:
    r = aioredis.Redis.from_url(REDIS_URL)
    try:
        return [k async for k in r.scan_iter(match=pattern)]
    finally:
        await r.aclose()


async def _delete(pattern: str) -> None:
    r = aioredis.Redis.from_url(REDIS_URL)
    try:
        keys = [k async for k in r.scan_iter(match=pattern)]
        if keys:
            await r.delete(*keys)
    finally:
        await r.aclose()


def test_run_with_all_hot_state_in_redis(tmp_path: Path) -> None:
    ns = f"run{time.monotonic_ns()}"
    env = {
        "IOTMESH_STORAGE__LATEST": "redis",
        "IOTMESH_STORAGE__REDIS__URL": REDIS_URL,
        "IOTMESH_STORAGE__REDIS__NAMESPACE": ns,
        "IOTMESH_STORAGE__REDIS__CONNECTIVITY": "true",
        "IOTMESH_STORAGE__REDIS__CONNECTIVITY_FLUSH_S": "0.1",
        "IOTMESH_STORAGE__REDIS__ATTRIBUTE_CACHE": "true",
        "IOTMESH_STORAGE__REDIS__RPC_WAKEUPS": "true",
    }
    srv = start_server(tmp_path / "data", tmp_path / "logs", env=env)
    try:
        with srv.admin() as admin:
            device = admin.post("/api/v1/devices", json={"name": "s"}).json()
            dev = f"/api/v1/devices/{device['id']}"
            api = str(admin.base_url).rstrip("/") + f"/api/v1/{device['access_token']}"
            with httpx.Client(base_url=api, timeout=10) as client:
                assert client.post("/telemetry", json={"ts": 5, "values": {"t": 1}}).is_success
                assert admin.get(f"{dev}/telemetry/latest").json() == {"t": [{"ts": 5, "value": 1}]}
                assert client.post("/attributes", json={"fw": "1.0"}).is_success
                assert admin.get(f"{dev}/twin").json()["reported"]["fw"]["value"] == "1.0"
                assert client.post("/attributes", json={"fw": "1.1"}).is_success
                attrs = admin.get(f"{dev}/attributes", params={"scope": "CLIENT"}).json()
                assert [(a["key"], a["value"]) for a in attrs] == [("fw", "1.1")]
                connectivity = admin.get(f"{dev}/connectivity").json()
                assert (connectivity["online"], connectivity["transport"]) == (True, "http")

                r = admin.post(
                    f"{dev}/rpc", json={"method": "open", "params": 1, "persistent": True}
                )
                rpc_id = r.json()["rpcId"]
                got: list[httpx.Response] = []
                poll = threading.Thread(
                    target=lambda: got.append(client.get("/rpc", params={"timeout": 5000}))
                )
                poll.start()
                poll.join(10)
                assert got[0].json() == {"id": rpc_id, "method": "open", "params": 1}
                assert client.post(f"/rpc/{rpc_id}", json={"ok": True}).is_success
                assert admin.get(f"{dev}/rpc/{rpc_id}").json()["status"] == "SUCCESSFUL"
        # Connectivity reaches Redis with the next flush (every 0.1 s here), not at once.
        conn_key = f"{ns}:conn:{device['id']}"
        deadline = time.monotonic() + 10
        while conn_key not in (keys := {k.decode() for k in asyncio.run(_keys(f"{ns}:*"))}):
            assert time.monotonic() < deadline, f"{conn_key} not flushed: {sorted(keys)}"
            time.sleep(0.05)
        assert f"{ns}:latest:{device['id']}" in keys
        assert f"{ns}:attr:{device['id']}:CLIENT:gen" in keys
    finally:
        srv.stop()
        asyncio.run(_delete(f"{ns}:*"))


def test_run_with_redis_down_ingests_and_reads_the_store(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        "IOTMESH_STORAGE__LATEST": "redis",
        "IOTMESH_STORAGE__REDIS__URL": f"redis://127.0.0.1:{port}/15",
        "IOTMESH_STORAGE__REDIS__TIMEOUT_S": "0.3",
        "IOTMESH_STORAGE__REDIS__CONNECTIVITY": "true",
        "IOTMESH_STORAGE__REDIS__ATTRIBUTE_CACHE": "true",
        "IOTMESH_STORAGE__REDIS__RPC_WAKEUPS": "true",
    }
    srv = start_server(tmp_path / "data", tmp_path / "logs", env=env)
    try:
        with srv.admin() as admin:
            device = admin.post("/api/v1/devices", json={"name": "s"}).json()
            dev = f"/api/v1/devices/{device['id']}"
            api = str(admin.base_url).rstrip("/") + f"/api/v1/{device['access_token']}"
            for ts in (5, 6):
                r = httpx.post(f"{api}/telemetry", json={"ts": ts, "values": {"t": ts}})
                assert r.status_code == 200
                assert admin.get(f"{dev}/telemetry/latest").json() == {
                    "t": [{"ts": ts, "value": ts}]
                }
            assert httpx.post(f"{api}/attributes", json={"fw": "1"}).is_success
            assert admin.get(f"{dev}/twin").json()["reported"]["fw"]["value"] == "1"
            assert admin.get(f"{dev}/connectivity").json()["online"]
            stats = admin.get("/api/v1/stats").json()["redis"]
            assert stats["errors_latest_update"] >= 1  # later batches skip Redis a while
            assert stats["errors_latest_update"] + stats["errors_latest_update_skipped"] >= 2
    finally:
        srv.stop()
