"""MQTT over TLS: access tokens and X.509 client certificates, with mosquitto_pub."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.mqtt_helpers import module_server
from tests.integration.pki import make_pki
from tests.integration.server import RunningServer

TS = 1_700_000_000_000


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A test CA, a server certificate for 127.0.0.1, and two client certificates."""
    return make_pki(tmp_path_factory.mktemp("pki"), ("device", "stranger"))


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, pki: Path) -> Iterator[RunningServer]:
    env = {
        "IOTMESH_MQTT__TLS_PORT": "0",
        "IOTMESH_MQTT__CERTFILE": str(pki / "server.pem"),
        "IOTMESH_MQTT__KEYFILE": str(pki / "server.key"),
        "IOTMESH_MQTT__CAFILE": str(pki / "ca.pem"),
    }
    with module_server(tmp_path_factory, "mqtt-tls", env) as server:
        yield server


def _pub(srv: RunningServer, pki: Path, payload: dict[str, Any], *args: str) -> int:
    assert srv.mqtt_tls_port is not None
    cmd = [
        "mosquitto_pub", "-h", "127.0.0.1", "-p", str(srv.mqtt_tls_port),
        "--cafile", str(pki / "ca.pem"), "-q", "1",
        "-t", "v1/devices/me/telemetry", "-m", json.dumps(payload), *args,
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, timeout=30, check=False).returncode


def _stored(rest: httpx.Client, device_id: str, key: str) -> list[Any]:
    url = f"/api/v1/devices/{device_id}/telemetry"
    data = rest.get(url, params={"keys": key, "start_ts": TS, "end_ts": TS + 10}).json()
    return [p["value"] for p in data.get(key, [])]


def test_access_token_over_tls(srv: RunningServer, rest: httpx.Client, pki: Path) -> None:
    device = rest.post("/api/v1/devices", json={"name": "tls-token"}).json()
    payload = {"ts": TS, "values": {"secure": 1}}
    assert _pub(srv, pki, payload, "-u", device["access_token"]) == 0
    assert _stored(rest, device["id"], "secure") == [1]


def test_client_certificate_identifies_the_device(
    srv: RunningServer, rest: httpx.Client, pki: Path
) -> None:
    device = rest.post("/api/v1/devices", json={"name": "tls-cert"}).json()
    pem = (pki / "device.pem").read_text()
    registered = rest.post(
        f"/api/v1/devices/{device['id']}/credentials", json={"certificate_pem": pem}
    )
    assert registered.status_code == 200, registered.text
    assert len(registered.json()["cert_fingerprint"]) == 64
    assert registered.json()["access_token"] == device["access_token"]

    cert = ["--cert", str(pki / "device.pem"), "--key", str(pki / "device.key")]
    assert _pub(srv, pki, {"ts": TS, "values": {"by_cert": 2}}, *cert) == 0
    assert _stored(rest, device["id"], "by_cert") == [2]

    stranger = ["--cert", str(pki / "stranger.pem"), "--key", str(pki / "stranger.key")]
    assert _pub(srv, pki, {"ts": TS, "values": {"by_cert": 3}}, *stranger) != 0


def test_certificate_errors(rest: httpx.Client, pki: Path) -> None:
    first = rest.post("/api/v1/devices", json={"name": "cert-owner"}).json()
    second = rest.post("/api/v1/devices", json={"name": "cert-thief"}).json()
    pem = (pki / "stranger.pem").read_text()
    url = "/api/v1/devices/{}/credentials"
    assert rest.post(url.format(first["id"]), json={"certificate_pem": pem}).status_code == 200
    taken = rest.post(url.format(second["id"]), json={"certificate_pem": pem})
    assert taken.status_code == 409
    assert "certificate" in taken.json()["detail"]
    bad = rest.post(url.format(second["id"]), json={"certificate_pem": "not a certificate"})
    assert bad.status_code == 400
