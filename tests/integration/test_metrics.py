"""`/metrics`, `/readyz` and `/livez` of a real server, read by real clients.

The scrape is parsed with Prometheus' own parser (prometheus_client), so a format error
fails here, not in a monitoring setup.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from iotmesh.app import Platform
from iotmesh.core.settings import Settings
from tests.integration.mqtt_helpers import device_client
from tests.integration.server import RunningServer, start_server

TELEMETRY = "v1/devices/me/telemetry"

Samples = dict[str, list[tuple[dict[str, str], float]]]


def scrape(url: str, **kwargs: Any) -> tuple[Samples, dict[str, str]]:
    """Sample name → [(labels, value)], and each family's type by sample name."""
    r = httpx.get(url + "/metrics", timeout=10, **kwargs)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
            types[sample.name] = family.type
    return samples, types


def value(samples: Samples, name: str, **labels: str) -> float:
    [found] = [v for have, v in samples[name] if labels.items() <= have.items()]
    return found


def test_metrics_show_the_services_counters_and_the_process(
    server: RunningServer, device: dict[str, Any]
) -> None:
    with device_client(server.mqtt_port, device["access_token"]) as client:
        for i in range(5):
            client.publish(TELEMETRY, json.dumps({"t": i}), qos=1)
        client.publish(TELEMETRY, json.dumps({"t": 9}), qos=0)

    samples, types = scrape(server.url)  # no credentials needed by default

    assert value(samples, "iotmesh_mqtt_messages_in_total", qos="1") == 5
    assert types["iotmesh_mqtt_messages_in_total"] == "counter"
    assert value(samples, "iotmesh_mqtt_connections_total") >= 1
    assert types["iotmesh_mqtt_connections"] == "gauge"
    assert value(samples, "iotmesh_writer_records_total") >= 5
    assert value(samples, "iotmesh_writer_commits_total") >= 1
    assert types["iotmesh_writer_pending_records"] == "gauge"
    assert types["iotmesh_event_loop_lag_max_ms"] == "gauge"
    assert types["iotmesh_event_loop_stalls_total"] == "counter"
    assert value(samples, "iotmesh_event_loop_samples_total") >= 1
    assert value(samples, "iotmesh_pipeline_dropped_total") == 0
    assert value(samples, "iotmesh_bus_queued") == 0
    assert value(samples, "iotmesh_ready") == 1
    assert value(samples, "iotmesh_service_healthy", service="writer") == 1

    info = json.loads((server.data_dir / "run.json").read_text())
    [(build, one)] = samples["iotmesh_build_info"]
    assert one == 1
    assert build["instance"] == info["instance_id"]
    assert build["version"] == info["version"]

    assert value(samples, "process_resident_memory_bytes") > 10 * 2**20
    assert value(samples, "process_open_fds") >= 3
    assert types["process_cpu_seconds_total"] == "counter"
    assert value(samples, "process_cpu_seconds_total") > 0
    assert value(samples, "process_start_time_seconds") > 1.6e9


def test_probes(server: RunningServer) -> None:
    with server.anonymous() as client:
        assert client.get("/livez").json() == {"status": "alive"}
        ready = client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json() == {"status": "ready"}
        assert client.get("/healthz").json()["status"] == "ok"


def test_metrics_can_require_the_admin_token(data_dir: Path, tmp_path: Path) -> None:
    srv = start_server(data_dir, tmp_path / "logs", env={"IOTMESH_HTTP__METRICS_AUTH": "true"})
    try:
        r = httpx.get(srv.url + "/metrics", timeout=10)
        assert r.status_code == 401
        assert r.headers["content-type"] == "application/problem+json"
        samples, _ = scrape(srv.url, headers={"Authorization": f"Bearer {srv.admin_token}"})
        assert value(samples, "iotmesh_ready") == 1
    finally:
        srv.stop()


async def test_readyz_is_503_once_shutdown_is_asked_for(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, http={"port": 0}, mqtt={"port": 0}, coap={"port": 0})
    async with Platform(settings) as platform:
        assert platform.http is not None
        url = f"http://127.0.0.1:{platform.http.port}"
        async with httpx.AsyncClient(base_url=url) as client:
            assert (await client.get("/readyz")).status_code == 200
            platform.shutdown()  # what SIGTERM does; the servers still answer meanwhile
            r = await client.get("/readyz")
            assert r.status_code == 503
            assert r.json() == {"status": "not ready", "reasons": ["shutting down"]}
            assert (await client.get("/livez")).status_code == 200
            metrics = (await client.get("/metrics")).text
            assert "\niotmesh_ready 0\n" in metrics
        await asyncio.wait_for(platform.wait_closed(), 5)
