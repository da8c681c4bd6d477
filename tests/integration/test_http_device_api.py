"""The ThingsBoard device HTTP API beyond telemetry, over HTTP/1.1 and HTTP/2 (h2c).

Attribute upload and read, the two long-polls (shared attributes, server-side RPC) with
their timeout and a client leaving mid-poll, client-side RPC, and bad input; each on a
real `iotmesh run` with httpx (and a raw socket where a client must vanish).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import httpx
import pytest

from tests.integration.mqtt_helpers import module_server, rpc_call, wait_until
from tests.integration.server import RunningServer, start_server

PROTOCOLS = ["http1", "http2"]
SERVERS = ["granian", "hypercorn"]  # http.server: both serve the same app
LONG = {"timeout": 20000}


@pytest.fixture(scope="module", params=SERVERS)
def srv(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    env = {"IOTMESH_HTTP__MAX_PAYLOAD_BYTES": "4096"}
    env["IOTMESH_HTTP__SERVER"] = request.param
    with module_server(tmp_path_factory, f"http-device-api-{request.param}", env) as server:
        yield server


@pytest.fixture(params=PROTOCOLS)
def protocol(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def dev(protocol: str, srv: RunningServer) -> Iterator[httpx.Client]:
    """A device-side client speaking HTTP/1.1, or HTTP/2 with prior knowledge (h2c)."""
    h2 = protocol == "http2"
    with srv.anonymous(http2=h2, http1=not h2) as client:
        yield client


def _device(rest: httpx.Client, name: str) -> dict[str, Any]:
    r = rest.post("/api/v1/devices", json={"name": name})
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


_names = iter(range(10**6))


@pytest.fixture
def device(rest: httpx.Client) -> dict[str, Any]:
    return _device(rest, f"http-dev-{next(_names)}")


def _polls(rest: httpx.Client) -> dict[str, int]:
    stats: dict[str, int] = rest.get("/api/v1/stats").json()["http"]
    return stats


def _waiting(rest: httpx.Client, kind: str, count: int) -> None:
    wait_until(lambda: _polls(rest)[f"long_polls_{kind}"] == count, f"{count} {kind} polls")


def test_attributes_upload_and_read(
    protocol: str, dev: httpx.Client, rest: httpx.Client, device: dict[str, Any]
) -> None:
    token, dev_id = device["access_token"], device["id"]
    r = dev.post(f"/api/v1/{token}/attributes", json={"fw": "1.2", "uptime": 360})
    assert r.status_code == 200, r.text
    assert r.http_version == {"http1": "HTTP/1.1", "http2": "HTTP/2"}[protocol]
    stored = rest.get(f"/api/v1/devices/{dev_id}/attributes", params={"scope": "CLIENT"}).json()
    assert {a["key"]: a["value"] for a in stored} == {"fw": "1.2", "uptime": 360}
    assert rest.post(f"/api/v1/devices/{dev_id}/attributes", json={"target": 21}).status_code == 200

    everything = dev.get(f"/api/v1/{token}/attributes").json()
    assert everything == {"client": {"fw": "1.2", "uptime": 360}, "shared": {"target": 21}}
    some = dev.get(f"/api/v1/{token}/attributes", params={"clientKeys": "fw", "sharedKeys": ""})
    assert some.json() == {"client": {"fw": "1.2"}}
    shared = dev.get(f"/api/v1/{token}/attributes", params={"sharedKeys": "target,nope"})
    assert shared.json() == {"shared": {"target": 21}}


def test_long_poll_gets_shared_attribute_set_over_rest(
    dev: httpx.Client, rest: httpx.Client, device: dict[str, Any]
) -> None:
    token, dev_id = device["access_token"], device["id"]
    with ThreadPoolExecutor(1) as pool:
        poll = pool.submit(
            dev.get, f"/api/v1/{token}/attributes/updates", params={"timeout": 20000}
        )
        _waiting(rest, "attributes", 1)
        assert rest.get(f"/api/v1/devices/{dev_id}").json()["id"] == dev_id
        r = rest.post(f"/api/v1/devices/{dev_id}/attributes", json={"targetTemperature": 22})
        assert r.status_code == 200
        answer = poll.result(timeout=20)
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"targetTemperature": 22}
    _waiting(rest, "attributes", 0)

    with ThreadPoolExecutor(1) as pool:  # a deletion arrives as {"deleted": [...]}
        poll = pool.submit(
            dev.get, f"/api/v1/{token}/attributes/updates", params={"timeout": 20000}
        )
        _waiting(rest, "attributes", 1)
        url = f"/api/v1/devices/{dev_id}/attributes"
        assert rest.delete(url, params={"keys": "targetTemperature"}).status_code == 200
        assert poll.result(timeout=20).json() == {"deleted": ["targetTemperature"]}


def test_long_poll_times_out_with_408(
    dev: httpx.Client, rest: httpx.Client, device: dict[str, Any]
) -> None:
    token = device["access_token"]
    for path in ("attributes/updates", "rpc"):
        r = dev.get(f"/api/v1/{token}/{path}", params={"timeout": 200})
        assert r.status_code == 408, r.text
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["status"] == 408
    assert _polls(rest)["long_polls_attributes"] == 0
    assert _polls(rest)["long_polls_rpc"] == 0
    assert dev.get(f"/api/v1/{token}/rpc", params={"timeout": -1}).status_code == 400


def test_rpc_long_poll_and_reply_round_trip(
    srv: RunningServer, dev: httpx.Client, device: dict[str, Any]
) -> None:
    token, dev_id = device["access_token"], device["id"]
    call = {"method": "setGpio", "params": {"pin": 4, "value": 1}, "timeout_ms": 20000}
    with rpc_call(srv, dev_id, call) as result:
        r = dev.get(f"/api/v1/{token}/rpc", params={"timeout": 20000})
        assert r.status_code == 200, r.text
        request = r.json()
        assert request["method"] == "setGpio"
        assert request["params"] == {"pin": 4, "value": 1}
        reply = dev.post(f"/api/v1/{token}/rpc/{request['id']}", json={"pin": 4, "value": 1})
        assert reply.status_code == 200
        answer = result.result(timeout=20)
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"pin": 4, "value": 1}
    stale = dev.post(f"/api/v1/{token}/rpc/{request['id']}", json={"late": True})
    assert stale.status_code == 200  # ignored, as ThingsBoard does
    assert dev.post(f"/api/v1/{token}/rpc/abc", json={}).status_code == 400


def test_client_side_rpc(dev: httpx.Client, device: dict[str, Any]) -> None:
    token = device["access_token"]
    before = int(time.time() * 1000)
    r = dev.post(f"/api/v1/{token}/rpc", json={"method": "getCurrentTime", "params": {}})
    assert r.status_code == 200, r.text
    assert r.json()["time"] >= before
    assert dev.post(f"/api/v1/{token}/rpc", json={"method": "ping"}).json() == {"pong": True}
    assert "error" in dev.post(f"/api/v1/{token}/rpc", json={"method": "reboot"}).json()
    assert dev.post(f"/api/v1/{token}/rpc", json={"params": 1}).status_code == 400


def _raw_poll(srv: RunningServer, path: str) -> socket.socket:
    """Start a long-poll on a raw HTTP/1.1 socket (so the test can drop it abruptly)."""
    host, port = srv.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    return sock


def test_client_leaving_mid_poll_leaves_no_listener(
    srv: RunningServer, rest: httpx.Client, device: dict[str, Any]
) -> None:
    token = device["access_token"]
    before = _polls(rest)["long_polls_abandoned"]
    for kind, path in (("attributes", "attributes/updates"), ("rpc", "rpc")):
        sock = _raw_poll(srv, f"/api/v1/{token}/{path}?timeout=60000")
        _waiting(rest, kind, 1)
        sock.close()
        _waiting(rest, kind, 0)
    assert _polls(rest)["long_polls_abandoned"] == before + 2

    # A later push finds no stale listener: the next poll gets it, nothing is logged.
    url = f"/api/v1/devices/{device['id']}/attributes"
    assert rest.post(url, json={"after": 1}).status_code == 200


def test_rpc_survives_a_poll_that_left(
    srv: RunningServer, rest: httpx.Client, device: dict[str, Any]
) -> None:
    """A request waiting while a poll's client vanishes goes to the next poll."""
    token, dev_id = device["access_token"], device["id"]
    sock = _raw_poll(srv, f"/api/v1/{token}/rpc?timeout=60000")
    _waiting(rest, "rpc", 1)
    sock.close()
    _waiting(rest, "rpc", 0)
    call = {"method": "ping", "params": {}, "timeout_ms": 20000}
    with rpc_call(srv, dev_id, call) as result, srv.anonymous() as dev:
        r = dev.get(f"/api/v1/{token}/rpc", params={"timeout": 20000})
        assert r.status_code == 200, r.text
        assert dev.post(f"/api/v1/{token}/rpc/{r.json()['id']}", json="pong").status_code == 200
        assert result.result(timeout=20).json() == "pong"


def _problem(r: httpx.Response, status: int) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["status"] == status


def test_bad_input_gets_its_code_and_others_are_served(
    dev: httpx.Client, rest: httpx.Client, device: dict[str, Any]
) -> None:
    token = device["access_token"]
    other = _device(rest, f"bystander-{next(_names)}")["access_token"]
    stop = threading.Event()
    served: list[int] = []

    def bystander() -> None:  # another device keeps uploading throughout
        with httpx.Client(base_url=dev.base_url, timeout=30) as client:
            while (not stop.is_set() or len(served) < 5) and len(served) < 10_000:
                served.append(client.post(f"/api/v1/{other}/telemetry", json={"t": 1}).status_code)

    thread = threading.Thread(target=bystander)
    thread.start()
    wait_until(lambda: served, "the other device's first upload")
    try:
        for path in ("telemetry", "attributes", "rpc"):
            _problem(dev.post(f"/api/v1/nope/{path}", json={"a": 1}), 401)
            _problem(dev.post(f"/api/v1/nope/{path}", content=b"{"), 401)  # token first
            _problem(dev.post(f"/api/v1/{token}/{path}", content=b'{"a": '), 400)
            _problem(dev.post(f"/api/v1/{token}/{path}", content=b"x" * 10_000), 413)
        for path in ("attributes", "attributes/updates", "rpc"):
            _problem(dev.get(f"/api/v1/nope/{path}", params={"timeout": 100}), 401)
        _problem(dev.post(f"/api/v1/{token}/attributes", json={"k": None}), 400)
        _problem(dev.post(f"/api/v1/{token}/attributes", json=[1]), 400)
        assert dev.post(f"/api/v1/{token}/telemetry", json={"ok": 1}).status_code == 200
    finally:
        stop.set()
        thread.join(30)
    assert served
    assert set(served) == {200}


@pytest.mark.parametrize("server_kind", SERVERS)
def test_shutdown_ends_waiting_polls_with_503(tmp_path: Path, server_kind: str) -> None:
    (tmp_path / "data").mkdir()
    env = {"IOTMESH_HTTP__SERVER": server_kind}
    server = start_server(tmp_path / "data", tmp_path / "logs", env=env)
    try:
        with server.admin() as rest:
            token = _device(rest, "stopping")["access_token"]
            with ThreadPoolExecutor(1) as pool, server.anonymous() as dev:
                poll = pool.submit(dev.get, f"/api/v1/{token}/rpc", params={"timeout": 60000})
                _waiting(rest, "rpc", 1)
                assert server.stop() == 0
                answer = poll.result(timeout=30)
    finally:
        server.stop()
    assert answer.status_code == 503, answer.text
    assert answer.headers["retry-after"]


def test_requests_count_as_device_activity(dev: httpx.Client, rest: httpx.Client) -> None:
    before = rest.get("/api/v1/stats").json()["connectivity"]["devices_seen"]
    token = _device(rest, f"active-{next(_names)}")["access_token"]
    assert dev.get(f"/api/v1/{token}/attributes").status_code == 200
    after = rest.get("/api/v1/stats").json()["connectivity"]
    assert after["devices_seen"] == before + 1
    assert after["online"] >= 1


def test_http2_stream_reset_mid_poll_leaves_no_listener(
    srv: RunningServer, rest: httpx.Client, device: dict[str, Any]
) -> None:
    """Over HTTP/2 a client gives up on a poll by resetting its stream (RST_STREAM); the
    connection stays open and keeps serving."""
    host, port = srv.url.removeprefix("http://").split(":")
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    with socket.create_connection((host, int(port)), timeout=10) as sock:

        def request(stream: int, path: str) -> None:
            headers = [(":method", "GET"), (":path", path), (":scheme", "http"),
                       (":authority", host)]  # fmt: skip
            conn.send_headers(stream, headers, end_stream=True)
            sock.sendall(conn.data_to_send())

        token = device["access_token"]
        request(1, f"/api/v1/{token}/attributes/updates?timeout=60000")
        _waiting(rest, "attributes", 1)
        conn.reset_stream(1)
        sock.sendall(conn.data_to_send())
        _waiting(rest, "attributes", 0)

        request(3, "/healthz")  # the same connection still serves
        status = None
        while status is None:
            for event in conn.receive_data(sock.recv(65536)):
                if isinstance(event, h2.events.ResponseReceived) and event.stream_id == 3:
                    status = dict(event.headers)[b":status"]
            sock.sendall(conn.data_to_send())
        assert status == b"200"
