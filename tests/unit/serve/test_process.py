"""`iotmesh serve` without engines: what it refuses, its files, its health app, its
registry record."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from iotmesh.cluster.backend import cluster_engine
from iotmesh.cluster.singleton import Singleton
from iotmesh.core.errors import ConfigError, StartupError
from iotmesh.core.lifecycle import Health, Service
from iotmesh.core.settings import Settings
from iotmesh.datadir import DataDir, read_instances
from iotmesh.serve import ROLES, InstanceInfo, ServedProcess
from iotmesh.serve.health import create_health_app
from iotmesh.serve.registration import addresses
from tests.unit.cluster.test_election import MemoryLeases
from tests.unit.cluster.test_singleton import Job


def test_serve_refuses_the_in_process_bus(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nats or redis"):
        ServedProcess(Settings(data_dir=tmp_path), "pipeline")


def test_serve_refuses_an_unknown_service(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, bus={"backend": "nats"})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="mqtt, coap, http, pipeline, writer, state"):
        ServedProcess(settings, "gateway")
    assert set(ROLES) == {"mqtt", "coap", "http", "pipeline", "writer", "state"}


def test_instances_share_a_data_dir_but_not_an_instance(tmp_path: Path) -> None:
    whole = DataDir(tmp_path)
    one = DataDir(tmp_path, "pipeline-1")
    two = DataDir(tmp_path, "pipeline-2")
    again = DataDir(tmp_path, "pipeline-1")
    whole.acquire()
    one.acquire()
    two.acquire()
    try:
        with pytest.raises(StartupError, match="instance pipeline-1"):
            again.acquire()
        one.write_run_info({"service": "pipeline", "pid": 1})
        two.write_run_info({"service": "pipeline", "pid": 2})
        assert [i["pid"] for i in read_instances(tmp_path)] == [1, 2]
        assert one.own_dir == tmp_path / "instances" / "pipeline-1"
        assert one.own_dir.is_dir()
    finally:
        one.release()
        two.release()
        whole.release()
    assert read_instances(tmp_path) == []


async def test_health_app_answers_healthz_info_and_stats() -> None:
    health = {"bus": Health(ok=True, detail="NatsBus"), "writer": Health(ok=True)}
    info = InstanceInfo("writer", "w1", {"health": "http://127.0.0.1:1"})
    app = create_health_app(lambda: health, lambda: info, lambda: {"writer": {"records": 3}})
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        r = await client.get("/healthz")
        assert r.status_code == 200
        assert r.json()["services"]["bus"] == {"ok": True, "detail": "NatsBus"}
        assert (await client.get("/info")).json()["instance_id"] == "w1"
        assert (await client.get("/stats")).json() == {"writer": {"records": 3}}
        health["writer"] = Health(ok=False, detail="commits failing")
        r = await client.get("/healthz")
        assert r.status_code == 503
        assert r.json()["status"] == "degraded"


async def test_health_app_answers_readyz_and_livez() -> None:
    reasons = ["starting"]
    app = create_health_app(lambda: {}, lambda: None, dict, lambda: reasons)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        r = await client.get("/readyz")
        assert r.status_code == 503
        assert r.json() == {"status": "not ready", "reasons": ["starting"]}
        reasons.clear()
        assert (await client.get("/readyz")).json() == {"status": "ready"}
        assert (await client.get("/livez")).status_code == 200


async def test_health_app_answers_metrics_with_the_leader_of_each_job() -> None:
    leases = MemoryLeases()
    job = Job()
    singleton = Singleton(leases, job, lease_s=5.0, owner="state-1")
    services: list[Service] = [singleton]
    app = create_health_app(dict, lambda: None, dict, list, services, "iotmesh-state")
    transport = httpx.ASGITransport(app=app)
    async with singleton, httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        r = await client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    [leader] = families["iotmesh_leader"].samples
    assert (leader.labels, leader.value) == ({"job": "retention"}, 1)
    [build] = families["iotmesh_build_info"].samples
    assert build.labels["service"] == "iotmesh-state"
    assert families["iotmesh_retention_terms"].type == "counter"
    assert families["iotmesh_retention_passes"].type == "counter"  # the job's own counter
    assert "process_cpu_seconds" in families


def test_the_registry_record_lists_urls_the_api_first() -> None:
    only_health = InstanceInfo("writer", "w1", {"health": "http://127.0.0.1:1"})
    assert addresses(only_health) == ["http://127.0.0.1:1"]
    api = InstanceInfo("http", "h1", {"health": "http://127.0.0.1:2", "http": "http://127.0.0.1:2"})
    assert addresses(api) == ["http://127.0.0.1:2"]
    coap = InstanceInfo("coap", "c1", {"coap": "127.0.0.1:5683", "health": "http://127.0.0.1:3"})
    assert addresses(coap) == ["http://127.0.0.1:3", "coap://127.0.0.1:5683"]
    mqtt = InstanceInfo("mqtt", "m1", {"mqtt": "127.0.0.1:1883", "health": "http://127.0.0.1:4"})
    assert addresses(mqtt) == ["http://127.0.0.1:4", "mqtt://127.0.0.1:1883"]


def test_the_cluster_engine_follows_the_bus_unless_named(tmp_path: Path) -> None:
    def engine(**kwargs: object) -> str:
        return cluster_engine(Settings(data_dir=tmp_path, **kwargs))  # type: ignore[arg-type]

    assert engine() == "redis"  # the in-process bus: the setting's default
    assert engine(bus={"backend": "nats"}) == "nats"
    assert engine(bus={"backend": "redis"}) == "redis"
    assert engine(bus={"backend": "nats"}, cluster={"backend": "redis"}) == "redis"
