"""CoAP over DTLS with pre-shared keys (identity = device id in 32 hex digits, key =
access token), spoken by libcoap's OpenSSL and GnuTLS clients to a real `iotmesh run`."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from iotmesh.core.ids import new_access_token
from tests.integration.coap_helpers import libcoap
from tests.integration.mqtt_helpers import module_server, new_device, points, set_shared
from tests.integration.server import RunningServer

pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("DTLSSocket") is None,
        reason="DTLSSocket missing (pip install -e '.[dtls]'; scripts/test installs it)",
    ),
    pytest.mark.skipif(shutil.which("coap-client-openssl") is None, reason="libcoap3-bin missing"),
]


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    env = {"IOTMESH_COAP__DTLS_PORT": "0"}
    with module_server(tmp_path_factory, "coap-dtls", env=env) as server:
        yield server


def _dtls_port(server: RunningServer) -> int:
    info = json.loads((server.data_dir / "run.json").read_text())
    port: int = info["coap"]["dtls_port"]
    return port


def coaps(server: RunningServer, path: str) -> str:
    return f"coaps://127.0.0.1:{_dtls_port(server)}/api/v1/{path}"


def psk(device: dict[str, Any], key: str | None = None) -> list[str]:
    """libcoap's PSK arguments for a device: identity = id without dashes."""
    return ["-u", device["id"].replace("-", ""), "-k", key or device["access_token"]]


def _device(rest: httpx.Client, name: str) -> dict[str, Any]:
    """A device whose token can be a PSK key: at most 16 bytes (tinydtls)."""
    r = rest.post("/api/v1/devices", json={"name": name, "access_token": new_access_token(16)})
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


@pytest.mark.parametrize("client", ["coap-client-openssl", "coap-client-gnutls"])
def test_telemetry_and_attributes_over_dtls(
    srv: RunningServer, rest: httpx.Client, client: str
) -> None:
    device = _device(rest, f"dtls-{client}")
    set_shared(rest, device["id"], {"target": 21})
    # The first handshake of an identity waits for the key to be fetched: the client's
    # flight is dropped once and sent again after its 1 s timer.
    url = coaps(srv, "telemetry")
    posted = libcoap("-B", "10", *psk(device), "-m", "post", "-e", '{"t": 1}', url, client=client)
    assert posted.error_code is None, posted.stderr
    assert [p["value"] for p in points(rest, device["id"], "t")] == [1]
    got = libcoap("-B", "10", *psk(device), "-m", "get", coaps(srv, "attributes"), client=client)
    assert got.error_code is None, got.stderr
    assert got.stdout.strip() == '{"client":{},"shared":{"target":21}}'
    # The token path works over DTLS too.
    url = coaps(srv, f"{device['access_token']}/telemetry")
    posted = libcoap("-B", "10", *psk(device), "-m", "post", "-e", '{"t": 2}', url, client=client)
    assert posted.error_code is None, posted.stderr
    assert sorted(p["value"] for p in points(rest, device["id"], "t")) == [1, 2]


def test_wrong_key_or_unknown_identity_opens_no_session(
    srv: RunningServer, rest: httpx.Client
) -> None:
    device = _device(rest, "dtls-wrong")
    generated = new_device(rest, "dtls-long-token")  # 20 characters: over tinydtls's 16
    url = coaps(srv, "telemetry")
    for args in (psk(device, "not-the-token"), ["-u", "0" * 32, "-k", "whatever"], psk(generated)):
        result = libcoap(
            "-B", "4", *args, "-m", "post", "-e", '{"w": 1}', url, client="coap-client-openssl"
        )  # fmt: skip
        # A 2.04 as a code, not inside a log line's timestamp such as "13:20:12.049".
        assert not re.search(r"(?<!\d)2\.04(?!\d)", result.stdout), result.stdout
    assert points(rest, device["id"], "w") == []
    assert points(rest, generated["id"], "w") == []
    # Plain CoAP without a token is not a session: 4.04 (the path needs a token).
    plain = libcoap(
        "-m", "post", "-e", '{"w": 1}', f"coap://127.0.0.1:{srv.coap_port}/api/v1/telemetry"
    )
    assert plain.error_code == "4.04", plain.stderr
