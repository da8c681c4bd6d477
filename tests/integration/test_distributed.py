"""The platform as separate OS processes on a real NATS JetStream and Redis Streams:
2 mqtt transports, 2 pipeline workers, 1 writer, 1 http (and the state service); and
the coap role on its own.

QoS 1 publishers on both transports; mid-load one pipeline worker and one transport are
killed with SIGKILL (their devices reconnect to the other transport). Afterwards, read
through the http service's REST API:

- every PUBACKed message is stored, nothing that was not sent is, and each is stored
  once (`v0`/`v1` hold every message at its own ts; one point per ts);
- per-device order held end to end: messages 2k and 2k+1 share a ts, so the store's
  `seq` at that ts is the one written last, which must be 2k+1 whenever 2k+1 was stored
  (and `latest` agrees with the newest point);
- nothing was dead-lettered or dropped;
- every process registered itself (`iotmesh services --json` lists all 7), and the two
  killed ones left the list within the failure detector's bound (docs/architecture.md,
  "Failure detection"; with a generous slack, and a registry TTL longer than both so
  that the detector, not the engine's expiry, is what removed them).
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from iotmesh.cli.services import read_services
from iotmesh.core.settings import ClusterSettings, Settings
from tests.integration import cluster
from tests.integration.cluster import T0, DeviceLoad, Instance
from tests.integration.coap_helpers import libcoap, requires_libcoap
from tests.integration.server import child_env, iotmesh_command

DEVICES = 200
MAX_MESSAGES = 150  # per device: bounded in count...
LOAD_S = 20.0  # ...and in time
KILL_AT = 0.3  # kill when this share of all messages is acknowledged...
KILL_AFTER_S = 10.0  # ...or after this long, whichever comes first
WINDOW = 4
SETTLE_S = 40.0
REGISTRY_TTL_S = 60.0  # longer than bound + slack: the detector must be what drops them
DETECTION_SLACK_S = 15.0  # a loaded 2-core machine: a correctness bound, not a timing


def detection_bound(c: ClusterSettings) -> float:
    """docs/architecture.md: interval + pause + z(phi_threshold) * std + 2 polls."""
    z = statistics.NormalDist().inv_cdf(1 - 10**-c.phi_threshold)
    return (
        c.heartbeat_interval_s
        + c.acceptable_pause_s
        + z * c.phi_min_std_dev_s
        + 2 * c.heartbeat_interval_s / 4
    )


async def _gone_after(settings: Settings, victims: list[Instance], killed_at: float) -> float:
    """Seconds from the kill until no victim is listed alive, as `iotmesh services`
    computes it (its own function, polled in process: cheaper than a CLI per poll)."""
    wanted = {(v.role, v.instance_id) for v in victims}
    poll = settings.cluster.heartbeat_interval_s / 4
    for _ in range(int(REGISTRY_TTL_S / poll)):
        rows = await read_services(settings, None)
        alive = {(r["service"], r["instance"]) for r in rows if r["alive"]}
        if not wanted & alive:
            return time.monotonic() - killed_at
        await asyncio.sleep(poll)
    return float("inf")


def _points(admin: httpx.Client, device_id: str) -> dict[str, list[dict[str, Any]]]:
    params = {"keys": "seq,v0,v1", "start_ts": T0, "end_ts": T0 + 10**6, "limit": 100_000}
    r = admin.get(f"/api/v1/devices/{device_id}/telemetry", params=params)
    assert r.status_code == 200, r.text
    found: dict[str, list[dict[str, Any]]] = r.json()
    return found


def _stored(points: dict[str, list[dict[str, Any]]]) -> list[int]:
    return [p["value"] for key in ("v0", "v1") for p in points.get(key, [])]


async def _load(loads: list[DeviceLoad], victims: list[Instance], registry: Settings) -> float:
    """Run the load, kill the victims mid-way; the seconds until they left the registry."""
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(cluster.publish(load, MAX_MESSAGES, WINDOW, stop), name=f"dev-{i}")
        for i, load in enumerate(loads)
    ]
    # Mid-load whatever the machine's speed: once a share of the messages is through.
    target = KILL_AT * len(loads) * MAX_MESSAGES
    for _ in range(int(KILL_AFTER_S / 0.05)):
        if sum(len(load.acked) for load in loads) >= target:
            break
        await asyncio.sleep(0.05)
    for victim in victims:
        victim.kill9()
    watch = asyncio.create_task(_gone_after(registry, victims, time.monotonic()), name="watch")
    done, pending = await asyncio.wait(tasks, timeout=LOAD_S)
    stop.set()
    await asyncio.gather(*pending, return_exceptions=True)
    for task in done:
        task.result()
    return await watch


@pytest.mark.slow
@pytest.mark.timeout(150)
@pytest.mark.parametrize("backend", ["nats", "redis"])
def test_kill_a_worker_and_a_transport_mid_load(backend: str, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    logs = tmp_path / "logs"
    env = cluster.bus_env(
        backend,
        IOTMESH_BUS__ACK_WAIT_S="3",  # a dead worker's partitions move after 3 s
        IOTMESH_STORAGE__SQLITE__SYNCHRONOUS="NORMAL",
        IOTMESH_LOG_LEVEL="warning",
        IOTMESH_CLUSTER__TTL_S=str(REGISTRY_TTL_S),
    )
    registry = cluster.cluster_settings(env)
    instances: list[Instance] = []
    try:
        # `state` first: it creates the state schema the others open.
        instances += cluster.start([("state", "1")], data_dir, logs, env)
        instances += cluster.start(
            [
                ("writer", "1"),
                ("pipeline", "1"),
                ("pipeline", "2"),
                ("mqtt", "1"),
                ("mqtt", "2"),
                ("http", "1"),
            ],
            data_dir,
            logs,
            env,
        )
        _, _, pipeline1, _, mqtt1, mqtt2, http = instances
        listed = {(r["service"], r["instance"]) for r in cluster.services(env) if r["alive"]}
        assert listed == {(i.role, i.instance_id) for i in instances}
        with cluster.admin_client(data_dir, http.url) as admin:
            devices = cluster.create_devices(admin, DEVICES, "dist")
            ports = [mqtt1.mqtt_port, mqtt2.mqtt_port]
            loads = [
                DeviceLoad(d["access_token"], ports[i % 2 :] + ports[: i % 2])
                for i, d in enumerate(devices)
            ]
            detected_s = asyncio.run(_load(loads, [pipeline1, mqtt1], registry))
            acked = sum(len(load.acked) for load in loads)
            moved = sum(load.reconnects for load in loads)
            assert acked > DEVICES * 10, f"too little load to test anything: {acked} acked"
            assert moved > 0, "no device was connected to the killed transport mid-load"
            sent = sum(load.sent for load in loads)
            print(f"{backend}: {sent} sent, {acked} PUBACKed, {moved} reconnects")

            # Wait until every PUBACKed message is visible (bounded).
            pending = list(zip(devices, loads, strict=True))
            deadline = time.monotonic() + SETTLE_S
            while pending and time.monotonic() < deadline:
                pending = [
                    (d, load)
                    for d, load in pending
                    if not load.acked <= set(_stored(_points(admin, d["id"])))
                ]
                if pending:
                    time.sleep(0.5)
            assert not pending, f"{len(pending)} devices miss PUBACKed messages"

            for device, load in zip(devices, loads, strict=True):
                points = _points(admin, device["id"])
                stored = _stored(points)
                # Stored once, and only what was sent.
                assert len(stored) == len(set(stored)), device["name"]
                assert set(stored) <= set(range(load.sent)), device["name"]
                for key, parity in (("v0", 0), ("v1", 1)):
                    for p in points.get(key, []):
                        assert p["value"] % 2 == parity
                        assert p["ts"] == T0 + p["value"] // 2
                # Order: where 2k+1 was stored, it was written after 2k.
                seq_at = {p["ts"]: p["value"] for p in points.get("seq", [])}
                for n in stored:
                    if n % 2 == 1:
                        assert seq_at[T0 + n // 2] == n, (device["name"], n)
                latest = admin.get(f"/api/v1/devices/{device['id']}/telemetry/latest").json()
                if seq_at:
                    newest = max(seq_at)
                    assert latest["seq"][0] == {"ts": newest, "value": seq_at[newest]}

        # The killed instances left `iotmesh services` within the detector's bound
        # (counted from the kill, which is after their last heartbeat); the others stay.
        bound = detection_bound(registry.cluster)
        print(f"{backend}: killed instances left the registry after {detected_s:.1f} s")
        assert detected_s <= bound + DETECTION_SLACK_S, (detected_s, bound)
        listed = {(r["service"], r["instance"]) for r in cluster.services(env)}
        survivors = {(i.role, i.instance_id) for i in instances if i not in (pipeline1, mqtt1)}
        assert listed == survivors
        for instance in instances:
            out = instance.output()
            assert "dead-lettered" not in out, out
            assert "dropped message" not in out, out
    finally:
        for instance in reversed(instances):
            instance.stop()
        asyncio.run(cluster.delete_bus_data(env))


@requires_libcoap
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_the_coap_role_takes_uploads_that_the_http_role_reads(tmp_path: Path) -> None:
    """`serve coap` as its own process: libcoap's client uploads, the writer stores, the
    http service reads back; the run-info file and the registry name the CoAP port."""
    data_dir = tmp_path / "data"
    env = cluster.bus_env("nats", IOTMESH_LOG_LEVEL="warning")
    instances: list[Instance] = []
    try:
        instances += cluster.start([("state", "1")], data_dir, tmp_path / "logs", env)
        instances += cluster.start(
            [("writer", "1"), ("pipeline", "1"), ("coap", "1"), ("http", "1")],
            data_dir,
            tmp_path / "logs",
            env,
        )
        coap, http = instances[3], instances[4]
        assert coap.info["coap"]["port"] > 0
        (row,) = [r for r in cluster.services(env) if r["service"] == "coap"]
        assert row["instance"] == "1"
        assert f"coap://127.0.0.1:{coap.coap_port}" in row["addresses"]
        assert row["addresses"][0] == coap.info["health"]["url"]
        with cluster.admin_client(data_dir, http.url) as admin:
            (device,) = cluster.create_devices(admin, 1, "coap")
            url = f"coap://127.0.0.1:{coap.coap_port}/api/v1/{device['access_token']}/telemetry"
            for n in range(3):
                sent = libcoap("-m", "post", "-e", f'{{"ts":{T0 + n},"values":{{"n":{n}}}}}', url)
                assert sent.returncode == 0, sent.stderr
                assert sent.error_code is None, sent.stderr
            # Acknowledged (2.04) means stored by the engine; visible once the writer ran.
            deadline = time.monotonic() + SETTLE_S
            stored: list[int] = []
            while time.monotonic() < deadline:
                params = {"keys": "n", "start_ts": T0, "end_ts": T0 + 10}
                r = admin.get(f"/api/v1/devices/{device['id']}/telemetry", params=params)
                assert r.status_code == 200, r.text
                stored = sorted(p["value"] for p in r.json().get("n", []))
                if stored == [0, 1, 2]:
                    break
                time.sleep(0.2)
            assert stored == [0, 1, 2]
    finally:
        for instance in reversed(instances):
            instance.stop()
        asyncio.run(cluster.delete_bus_data(env))


@pytest.mark.timeout(60)
def test_serve_refuses_the_memory_bus(tmp_path: Path) -> None:
    cmd = iotmesh_command("serve", "pipeline", "--data-dir", str(tmp_path))
    done = subprocess.run(cmd, env=child_env(), capture_output=True, timeout=50, check=False)
    assert done.returncode == 2
    assert b"set bus.backend to nats or redis" in done.stderr
