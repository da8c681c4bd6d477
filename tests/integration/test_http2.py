"""HTTP/2 on a real `iotmesh run`: h2c with prior knowledge on the plain port, and
HTTPS with ALPN h2 / http/1.1 on `http.tls_port`; clients: curl, httpx, h2load."""

from __future__ import annotations

import json
import re
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.mqtt_helpers import module_server
from tests.integration.pki import make_pki
from tests.integration.server import RunningServer, start_server

TS = 1_700_000_000_000
SERVERS = ["granian", "hypercorn"]  # http.server: both serve the same app
CURL_S = 30
JSON = "Content-Type: application/json"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module", params=SERVERS)
def srv(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, pki: Path
) -> Iterator[RunningServer]:
    env = {
        "IOTMESH_HTTP__TLS_PORT": "0",
        "IOTMESH_HTTP__CERTFILE": str(pki / "server.pem"),
        "IOTMESH_HTTP__KEYFILE": str(pki / "server.key"),
    }
    env["IOTMESH_HTTP__SERVER"] = request.param
    with module_server(tmp_path_factory, f"http2-{request.param}", env) as server:
        yield server


@pytest.fixture
def device(rest: httpx.Client, request: pytest.FixtureRequest) -> dict[str, Any]:
    r = rest.post("/api/v1/devices", json={"name": request.node.name})
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


def _stored(rest: httpx.Client, device_id: str, key: str) -> list[Any]:
    url = f"/api/v1/devices/{device_id}/telemetry"
    data = rest.get(url, params={"keys": key, "start_ts": TS, "end_ts": TS + 10}).json()
    return [p["value"] for p in data.get(key, [])]


def _curl(*args: str) -> tuple[str, str]:
    """Run curl; return (body, '<status> <http version>')."""
    cmd = ["curl", "-sS", "--max-time", "20", "-w", "\n%{http_code} %{http_version}", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=CURL_S, check=True).stdout
    body, _, meta = out.rpartition("\n")
    return body, meta


def test_curl_h2c_prior_knowledge(
    srv: RunningServer, device: dict[str, Any], rest: httpx.Client
) -> None:
    body = json.dumps({"ts": TS, "values": {"h2c": 1}})
    url = f"{srv.url}/api/v1/{device['access_token']}/telemetry"
    _, meta = _curl("--http2-prior-knowledge", "-H", JSON, "-d", body, url)
    assert meta == "200 2"
    query = f"{srv.url}/api/v1/devices/{device['id']}/telemetry?keys=h2c&start_ts={TS}"
    auth = f"Authorization: Bearer {srv.admin_token}"
    text, meta = _curl("--http2-prior-knowledge", "-H", auth, query)
    assert meta == "200 2"
    assert '"value":1' in text.replace(" ", "")


def test_httpx_http2_only(srv: RunningServer, device: dict[str, Any]) -> None:
    token = device["access_token"]
    with srv.admin(http2=True, http1=False) as h2:
        r = h2.post(f"/api/v1/{token}/telemetry", json={"ts": TS, "values": {"httpx": 2}})
        assert (r.status_code, r.http_version) == (200, "HTTP/2")
        q = h2.get(
            f"/api/v1/devices/{device['id']}/telemetry", params={"keys": "httpx", "start_ts": TS}
        )
        assert q.http_version == "HTTP/2"
        assert [p["value"] for p in q.json()["httpx"]] == [2]


def test_tls_alpn_offers_h2_and_http11(
    srv: RunningServer, pki: Path, device: dict[str, Any], rest: httpx.Client
) -> None:
    assert srv.tls_url is not None
    token = device["access_token"]
    url = f"{srv.tls_url}/api/v1/{token}/telemetry"
    ca = str(pki / "ca.pem")
    for flag, version, value in (("--http2", "2", 1), ("--http1.1", "1.1", 2)):
        body = json.dumps({"ts": TS, "values": {f"tls_{version.replace('.', '')}": value}})
        _, meta = _curl(flag, "--cacert", ca, "-H", JSON, "-d", body, url)
        assert meta == f"200 {version}"
    # TLS 1.2 is accepted too (many devices have no TLS 1.3).
    health = f"{srv.tls_url}/healthz"
    _, meta = _curl("--http2", "--tlsv1.2", "--tls-max", "1.2", "--cacert", ca, health)
    assert meta == "200 2"
    assert _stored(rest, device["id"], "tls_2") == [1]
    assert _stored(rest, device["id"], "tls_11") == [2]

    trust = ssl.create_default_context(cafile=ca)
    with httpx.Client(base_url=srv.tls_url, http2=True, verify=trust, timeout=30) as client:
        r = client.post(f"/api/v1/{token}/telemetry", json={"ts": TS, "values": {"httpx_tls": 3}})
        assert (r.status_code, r.http_version) == (200, "HTTP/2")
        r = client.get(f"/api/v1/{token}/attributes")
        assert (r.status_code, r.http_version) == (200, "HTTP/2")
    assert _stored(rest, device["id"], "httpx_tls") == [3]


def _h2load(url: str, body: Path, requests: int) -> dict[str, int]:
    cmd = [
        "h2load", "-n", str(requests), "-c", "4", "-m", "32", "-d", str(body),
        "-H", "Content-Type: application/json", url,
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
    m = re.search(r"(\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout", out)
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    assert m is not None, out
    assert codes is not None, out
    return {
        "succeeded": int(m[1]),
        "failed": int(m[2]),
        "errored": int(m[3]),
        "timeout": int(m[4]),
        "2xx": int(codes[1]),
    }


@pytest.mark.parametrize("scheme", ["h2c", "h2"])
def test_h2load_many_streams_without_errors(
    srv: RunningServer, device: dict[str, Any], rest: httpx.Client, tmp_path: Path, scheme: str
) -> None:
    body = tmp_path / "body.json"
    body.write_text('{"load": 1}')
    base = srv.url if scheme == "h2c" else srv.tls_url
    result = _h2load(f"{base}/api/v1/{device['access_token']}/telemetry", body, 2000)
    assert result == {"succeeded": 2000, "failed": 0, "errored": 0, "timeout": 0, "2xx": 2000}
    keys = rest.get(f"/api/v1/devices/{device['id']}/telemetry/keys").json()
    assert keys == ["load"]


def test_tls_port_without_certificate_fails_startup(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    env = {"IOTMESH_HTTP__TLS_PORT": "0"}
    with pytest.raises(RuntimeError, match=r"http.tls_port needs http.certfile and http.keyfile"):
        start_server(tmp_path / "data", tmp_path / "logs", env=env)
