"""MQTT over TLS: access tokens and X.509 client certificates, with mosquitto_pub."""

from __future__ import annotations

import datetime
import ipaddress
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.integration.mqtt_helpers import module_server
from tests.integration.server import RunningServer

TS = 1_700_000_000_000


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: str,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    ip: str | None = None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ip is not None:
        san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))])
        builder = builder.add_extension(san, critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    path.with_suffix(".pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A test CA, a server certificate for 127.0.0.1, and two client certificates."""
    root: Path = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("iotmesh test CA", ca_key, "iotmesh test CA", ca_key, ca=True)
    _write(root / "ca", ca, ca_key)
    for name, ip in (("server", "127.0.0.1"), ("device", None), ("stranger", None)):
        key = ec.generate_private_key(ec.SECP256R1())
        _write(root / name, _certificate(name, key, "iotmesh test CA", ca_key, ip=ip), key)
    return root


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
