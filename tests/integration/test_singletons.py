"""Singleton jobs and /metrics of `iotmesh serve` processes, on real NATS and Redis.

- Two `state` instances (time series in PostgreSQL, so `state` hosts retention): exactly
  one leads `retention` and runs its passes (`iotmesh_leader{job="retention"}` and
  `iotmesh_retention_passes` on /metrics), and its token is in the engine's fence;
  `kill -9` of the leader, and the other leads and runs passes within the lease bound
  of election.py, with a newer token in the fence.
- RPC housekeeping: two `state` instances, one leads `rpc_housekeeping`; a persistent
  request for a device that never connects, stored through the `http` instance, becomes
  EXPIRED once its expiration passed (GET .../rpc/{rpcId} shows it: nothing but the
  leader's sweep ends it) and is purged after `devices.rpc_retention_s`; the leader's
  counters show both, the standby's none, and `http` runs no housekeeping.
- Every role answers /metrics on its health listener (the http role: on its API port)
  with Prometheus text that prometheus_client's parser reads: build info naming the
  role, readiness, process metrics, its services' counters.

The bounds are correctness bounds with slack for a loaded 2-core machine, not timings.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from iotmesh.cluster import make_backend
from iotmesh.storage.rollup import RETENTION_FENCE
from iotmesh.storage.rpc_rows import RPC_FENCE
from tests.integration import cluster
from tests.integration.cluster import Instance
from tests.postgres import PgServer

LEASE_S = 2.0
SLACK_S = 8.0  # scheduling of several processes on a busy 2-core machine
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Samples = dict[str, list[tuple[dict[str, str], float]]]


def metrics_url(instance: Instance) -> str:
    return str(instance.info["health"]["url"]) + "/metrics"


def scrape(instance: Instance) -> tuple[Samples, dict[str, str]]:
    """Sample name → [(labels, value)] and family types, parsed by prometheus_client."""
    r = httpx.get(metrics_url(instance), timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == CONTENT_TYPE
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(r.text):
        types[family.name] = family.type
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples, types


def value(samples: Samples, name: str, **labels: str) -> float | None:
    found = [v for have, v in samples.get(name, []) if labels.items() <= have.items()]
    assert len(found) <= 1, (name, found)
    return found[0] if found else None


def leading(instance: Instance) -> tuple[bool, float]:
    """Whether the instance leads `retention`, and the passes it ran."""
    samples, _ = scrape(instance)
    return value(samples, "iotmesh_leader", job="retention") == 1, (
        value(samples, "iotmesh_retention_passes") or 0
    )


def wait_leading(instance: Instance, within: float) -> float:
    """Seconds until the instance leads `retention` and has run a pass."""
    started = time.monotonic()
    while time.monotonic() - started < within:
        leader, passes = leading(instance)
        if leader and passes >= 1:
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"{instance.role}-{instance.instance_id} did not lead in {within} s")


def stop_all(instances: list[Instance]) -> None:
    """SIGTERM to all at once (they drain in parallel), then wait for each."""
    for instance in instances:
        if instance.proc.poll() is None:
            instance.proc.terminate()
    for instance in reversed(instances):
        instance.stop()


async def fence(env: dict[str, str], resource: str = RETENTION_FENCE) -> tuple[int, bytes] | None:
    backend = make_backend(cluster.cluster_settings(env))
    async with backend:
        return await backend.read(resource)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", ["nats", "redis"])
def test_one_state_instance_runs_retention_and_the_other_takes_over_after_kill9(
    backend: str, postgres: PgServer, tmp_path: Path
) -> None:
    pg = postgres.settings(str(tmp_path))
    env = cluster.bus_env(
        backend,
        IOTMESH_CLUSTER__LEASE_S=str(LEASE_S),
        IOTMESH_STORAGE__TIMESERIES="postgres",
        IOTMESH_STORAGE__POSTGRES__URL=pg.url,
        IOTMESH_STORAGE__POSTGRES__SCHEMA_NAME=pg.schema_name,
        IOTMESH_STORAGE__RETENTION__RAW_TTL_S="86400",
        IOTMESH_STORAGE__RETENTION__INTERVAL_S="0.2",
        IOTMESH_LOG_LEVEL="warning",
    )
    instances: list[Instance] = []
    try:
        instances += cluster.start(
            [("state", "1"), ("state", "2")], tmp_path / "data", tmp_path / "logs", env
        )
        # The first election round is part of start-up: one of them leads already.
        states = {i.instance_id: leading(i)[0] for i in instances}
        assert sorted(states.values()) == [False, True], states
        leader = next(i for i in instances if states[i.instance_id])
        standby = next(i for i in instances if i is not leader)
        wait_leading(leader, 30)
        assert leading(standby) == (False, 0)  # a candidate, not running the job
        first = asyncio.run(fence(env))
        assert first is not None
        assert first[1] == f"state-{leader.instance_id}".encode()

        leader.kill9()
        took = wait_leading(standby, LEASE_S * 4 + SLACK_S)
        print(f"{backend}: the standby led and ran retention {took:.1f} s after the kill")
        assert took <= LEASE_S + LEASE_S / 3 + SLACK_S  # election.py's bound, with slack
        second = asyncio.run(fence(env))
        assert second is not None
        assert second[1] == f"state-{standby.instance_id}".encode()
        assert second[0] > first[0]  # a new term: the dead leader's writes are refused
    finally:
        stop_all(instances)
        asyncio.run(cluster.delete_bus_data(env))


HOUSEKEEPING = "rpc_housekeeping"


def housekeeping(instance: Instance) -> tuple[float | None, float, float]:
    """The instance's `iotmesh_leader{job="rpc_housekeeping"}`, and the requests its
    job expired and purged."""
    samples, _ = scrape(instance)
    return (
        value(samples, "iotmesh_leader", job=HOUSEKEEPING),
        value(samples, "iotmesh_rpc_housekeeping_expired_total") or 0,
        value(samples, "iotmesh_rpc_housekeeping_purged_total") or 0,
    )


def wait_status(
    admin: httpx.Client, url: str, wanted: int, status: str | None, within: float
) -> None:
    """Poll GET `url` until it answers `wanted` (and, for 200, the RPC status `status`)."""
    deadline = time.monotonic() + within
    seen = None
    while time.monotonic() < deadline:
        r = admin.get(url)
        seen = (r.status_code, r.json().get("status") if r.status_code == 200 else None)
        if seen == (wanted, status):
            return
        time.sleep(0.05)
    raise AssertionError(f"{url}: {seen} after {within} s, wanted {(wanted, status)}")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", ["nats", "redis"])
def test_the_elected_state_instance_expires_unheld_rpc_requests_and_purges_them(
    backend: str, tmp_path: Path
) -> None:
    env = cluster.bus_env(
        backend,
        IOTMESH_CLUSTER__LEASE_S=str(LEASE_S),
        IOTMESH_DEVICES__RPC_SWEEP_INTERVAL_S="0.2",
        IOTMESH_DEVICES__RPC_RETENTION_S="3",
        IOTMESH_DEVICES__RPC_PURGE_INTERVAL_S="0.5",
        IOTMESH_LOG_LEVEL="warning",
    )
    data_dir, logs = tmp_path / "data", tmp_path / "logs"
    instances: list[Instance] = []
    try:
        instances += cluster.start([("state", "1"), ("state", "2")], data_dir, logs, env)
        instances += cluster.start([("http", "1")], data_dir, logs, env)
        states, http = instances[:2], instances[2]
        leads = {i.instance_id: housekeeping(i)[0] for i in states}
        assert sorted(leads.values()) == [0, 1], leads  # elected during start-up
        leader = next(i for i in states if leads[i.instance_id] == 1)
        standby = next(i for i in states if i is not leader)

        with cluster.admin_client(data_dir, http.url) as admin:
            (device,) = cluster.create_devices(admin, 1, "offline")
            rpc_url = f"/api/v1/devices/{device['id']}/rpc"
            expires = int(time.time() * 1000) + 1000
            body = {"method": "reboot", "persistent": True, "expirationTime": expires}
            r = admin.post(rpc_url, json=body)
            assert r.status_code == 200, r.text
            url = f"{rpc_url}/{r.json()['rpcId']}"
            assert admin.get(url).json()["status"] == "QUEUED"
            # No session anywhere holds it: only the leader's sweep can end it.
            wait_status(admin, url, 200, "EXPIRED", 1 + SLACK_S)
            record = admin.get(url).json()
            assert record["finished_ts"] >= expires
            wait_status(admin, url, 404, None, 3 + SLACK_S)  # purged after rpc_retention_s

        assert housekeeping(leader) == (1, 1, 1)
        assert housekeeping(standby) == (0, 0, 0)  # a candidate that never ran the job
        assert housekeeping(http) == (None, 0, 0)  # no purge, no sweep in transports
        written = asyncio.run(fence(env, RPC_FENCE))
        assert written is not None
        assert written[1] == f"state-{leader.instance_id}".encode()
    finally:
        stop_all(instances)
        asyncio.run(cluster.delete_bus_data(env))


# A metric family of each role's own services (beyond those every process has).
OWN = {
    "mqtt": "iotmesh_mqtt_connections",
    "coap": "iotmesh_coap_requests",
    "http": "iotmesh_http_long_polls_answered",
    "pipeline": "iotmesh_pipeline_dropped",
    "writer": "iotmesh_writer_commits",
    "state": "iotmesh_service_healthy",
}


@pytest.mark.timeout(120)
def test_every_role_answers_metrics(tmp_path: Path) -> None:
    env = cluster.bus_env("redis", IOTMESH_LOG_LEVEL="warning")
    data_dir, logs = tmp_path / "data", tmp_path / "logs"
    instances: list[Instance] = []
    try:
        # `state` first: it creates the state schema the others open. One at a time:
        # six processes starting at once on a busy 2-core machine miss the start-up
        # deadline of cluster.py.
        for role in ("state", "mqtt", "coap", "http", "pipeline", "writer"):
            instances += cluster.start([(role, "1")], data_dir, logs, env)
        for instance in instances:
            samples, types = scrape(instance)
            where = instance.role
            [(build, one)] = samples["iotmesh_build_info"]
            assert one == 1
            assert build["service"] == f"iotmesh-{instance.role}", where
            assert value(samples, "iotmesh_ready") == 1, where
            assert types["process_cpu_seconds"] == "counter", where
            assert (value(samples, "process_resident_memory_bytes") or 0) > 0, where
            assert types.get(OWN[instance.role]), (where, sorted(types))
            assert all(v == 1 for _, v in samples["iotmesh_service_healthy"]), where
            # SQLite time series: the writer hosts retention, the only candidate.
            leader = value(samples, "iotmesh_leader", job="retention")
            assert leader == (1 if instance.role == "writer" else None), where
    finally:
        stop_all(instances)
        asyncio.run(cluster.delete_bus_data(env))
