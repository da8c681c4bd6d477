"""Device state on a real `iotmesh run` with paho-mqtt devices: persistent RPC (offline,
expiry, a platform restart), the twin, and connectivity over MQTT and a gateway."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.mqtt_helpers import (
    V5,
    V311,
    PahoClient,
    device_client,
    module_server,
    new_device,
    set_shared,
    wait_until,
)
from tests.integration.server import RunningServer, start_server

RPC_REQUESTS = "v1/devices/me/rpc/request/+"
INACTIVITY_S = 1  # the module's server: offline 1 s after the last activity

_names = itertools.count()


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    env = {"IOTMESH_DEVICES__INACTIVITY_TIMEOUT_S": str(INACTIVITY_S)}
    with module_server(tmp_path_factory, "device-state", env=env) as server:
        yield server


@pytest.fixture
def dev(rest: httpx.Client) -> dict[str, Any]:
    return new_device(rest, f"state-device-{next(_names)}")


def _post_rpc(rest: httpx.Client, device_id: str, body: dict[str, Any]) -> dict[str, Any]:
    r = rest.post(f"/api/v1/devices/{device_id}/rpc", json=body)
    assert r.status_code == 200, r.text
    answer: dict[str, Any] = r.json()
    return answer


def _rpc(rest: httpx.Client, device_id: str, rpc_id: int) -> dict[str, Any]:
    r = rest.get(f"/api/v1/devices/{device_id}/rpc/{rpc_id}")
    assert r.status_code == 200, r.text
    record: dict[str, Any] = r.json()
    return record


def _status_becomes(rest: httpx.Client, device_id: str, rpc_id: int, status: str) -> None:
    wait_until(lambda: _rpc(rest, device_id, rpc_id)["status"] == status, f"RPC {status}")


def _connectivity(rest: httpx.Client, device_id: str) -> dict[str, Any]:
    r = rest.get(f"/api/v1/devices/{device_id}/connectivity")
    assert r.status_code == 200, r.text
    state: dict[str, Any] = r.json()
    return state


def _answer_one(client: PahoClient, reply: Any) -> tuple[int, dict[str, Any]]:
    """Take the next RPC request, reply to it; return its id and body."""
    request = client.expect(RPC_REQUESTS)
    request_id = int(request.topic.rsplit("/", 1)[1])
    assert client.publish(f"v1/devices/me/rpc/response/{request_id}", reply).value == 0
    body: dict[str, Any] = json.loads(request.payload)
    return request_id, body


@pytest.mark.parametrize("version", [V311, V5], ids=["v311", "v5"])
def test_persistent_rpc_to_an_offline_device_is_delivered_when_it_connects(
    srv: RunningServer, rest: httpx.Client, dev: dict[str, Any], version: int
) -> None:
    body = {"method": "setValve", "params": {"open": 30}, "persistent": True, "timeout_ms": 10_000}
    queued = _post_rpc(rest, dev["id"], body)
    assert queued["status"] == "QUEUED"
    rpc_id = queued["rpcId"]
    assert isinstance(rpc_id, int)
    with device_client(srv.mqtt_port, dev["access_token"], version) as client:
        client.subscribed(RPC_REQUESTS)
        request_id, request = _answer_one(client, {"valve": 30})
        assert request_id == rpc_id
        assert request == {"method": "setValve", "params": {"open": 30}}
        # The PUBACK of the reply came after it was stored: no waiting needed.
        record = _rpc(rest, dev["id"], rpc_id)
    assert record["status"] == "SUCCESSFUL"
    assert record["response"] == {"valve": 30}
    assert record["persistent"] is True
    assert record["created_ts"] <= record["sent_ts"] <= record["delivered_ts"]
    assert record["delivered_ts"] <= record["finished_ts"]
    listed = rest.get(f"/api/v1/devices/{dev['id']}/rpc", params={"status": "SUCCESSFUL"})
    assert [r["id"] for r in listed.json()["data"]] == [rpc_id]


def test_expired_request_is_never_delivered(
    srv: RunningServer, rest: httpx.Client, dev: dict[str, Any]
) -> None:
    short = {"method": "old", "persistent": True, "expiration_ms": 300, "oneway": True}
    expired = _post_rpc(rest, dev["id"], short)["rpcId"]
    _status_becomes(rest, dev["id"], expired, "EXPIRED")
    fresh = _post_rpc(rest, dev["id"], {"method": "new", "persistent": True, "oneway": True})
    with device_client(srv.mqtt_port, dev["access_token"]) as client:
        client.subscribed(RPC_REQUESTS)
        request = client.expect(RPC_REQUESTS)
        assert json.loads(request.payload)["method"] == "new"
        assert request.topic.endswith(f"/{fresh['rpcId']}")
        _status_becomes(rest, dev["id"], fresh["rpcId"], "SUCCESSFUL")  # one-way: delivered
    one = _rpc(rest, dev["id"], fresh["rpcId"])
    assert one["delivered_ts"] == one["finished_ts"]
    page = rest.get(f"/api/v1/devices/{dev['id']}/rpc").json()
    assert [(r["method"], r["status"]) for r in page["data"]] == [
        ("new", "SUCCESSFUL"),
        ("old", "EXPIRED"),
    ]


def test_two_way_persistent_request_times_out_without_reply(
    srv: RunningServer, rest: httpx.Client, dev: dict[str, Any]
) -> None:
    with device_client(srv.mqtt_port, dev["access_token"]) as client:
        client.subscribed(RPC_REQUESTS)
        body = {"method": "ignored", "persistent": True, "timeout_ms": 300}
        rpc_id = _post_rpc(rest, dev["id"], body)["rpcId"]
        client.expect(RPC_REQUESTS)
        _status_becomes(rest, dev["id"], rpc_id, "TIMEOUT")
        # A late reply is ignored, and still acknowledged.
        assert client.publish(f"v1/devices/me/rpc/response/{rpc_id}", {"late": 1}).value == 0
    assert _rpc(rest, dev["id"], rpc_id)["response"] is None


def test_rpc_api_errors(rest: httpx.Client, dev: dict[str, Any]) -> None:
    base = f"/api/v1/devices/{dev['id']}/rpc"
    r = rest.post(base, json={"method": "m", "expiration_ms": 10})
    assert r.status_code == 400, r.text  # expiration without persistent
    r = rest.post(base, json={"method": "m", "persistent": True, "expirationTime": 1})
    assert r.status_code == 400, r.text  # in the past
    assert rest.get(f"{base}/999").status_code == 404
    rpc_id = _post_rpc(rest, dev["id"], {"method": "m", "persistent": True})["rpcId"]
    assert rest.delete(f"{base}/{rpc_id}").status_code == 204
    assert rest.get(f"{base}/{rpc_id}").status_code == 404
    assert rest.get(base, params={"status": "NOPE"}).status_code == 400


def test_twin_shows_shared_as_desired_and_client_as_reported(
    srv: RunningServer, rest: httpx.Client, dev: dict[str, Any]
) -> None:
    empty = rest.get(f"/api/v1/devices/{dev['id']}/twin").json()
    assert empty == {"desired": {}, "reported": {}, "desired_version": 0, "reported_version": 0}
    set_shared(rest, dev["id"], {"target": 21})
    set_shared(rest, dev["id"], {"target": 22, "mode": "eco"})
    with device_client(srv.mqtt_port, dev["access_token"]) as client:
        assert client.publish("v1/devices/me/attributes", {"fw": "1.2"}).value == 0
    twin = rest.get(f"/api/v1/devices/{dev['id']}/twin").json()
    assert {k: (v["value"], v["version"]) for k, v in twin["desired"].items()} == {
        "target": (22, 2),
        "mode": ("eco", 1),
    }
    assert {k: (v["value"], v["version"]) for k, v in twin["reported"].items()} == {
        "fw": ("1.2", 1)
    }
    assert (twin["desired_version"], twin["reported_version"]) == (2, 1)
    assert twin["reported"]["fw"]["ts"] >= twin["desired"]["target"]["ts"]
    assert rest.get("/api/v1/devices/nope/twin").status_code == 404


def test_connectivity_online_while_connected_offline_after_inactivity(
    srv: RunningServer, rest: httpx.Client, dev: dict[str, Any]
) -> None:
    assert _connectivity(rest, dev["id"])["online"] is False
    with device_client(srv.mqtt_port, dev["access_token"]) as client:
        state = _connectivity(rest, dev["id"])
        assert state["online"] is True
        assert (state["transport"], state["sessions"]) == ("mqtt", 1)
        assert state["last_connect_ts"] > 0
        connected = state["last_activity_ts"]
        assert client.publish("v1/devices/me/telemetry", {"t": 1}).value == 0
        assert _connectivity(rest, dev["id"])["last_activity_ts"] >= connected
        shown = rest.get(f"/api/v1/devices/{dev['id']}").json()["connectivity"]
        assert shown["online"] is True
    wait_until(lambda: _connectivity(rest, dev["id"])["sessions"] == 0, "the session to end")
    assert _connectivity(rest, dev["id"])["last_disconnect_ts"] > 0
    # No session: online until the inactivity timeout runs out after the last activity.
    wait_until(
        lambda: not _connectivity(rest, dev["id"])["online"],
        "offline after the inactivity timeout",
        timeout=INACTIVITY_S + 10,
    )


def test_a_taken_over_connection_does_not_leave_a_session_behind(
    srv: RunningServer, rest: httpx.Client, dev: dict[str, Any]
) -> None:
    token = dev["access_token"]
    with PahoClient(srv.mqtt_port, token, client_id=f"same-{dev['id']}") as first:
        assert first.connect().value == 0
        with device_client(srv.mqtt_port, token, client_id=f"same-{dev['id']}"):
            first.wait_disconnected()
            wait_until(lambda: _connectivity(rest, dev["id"])["sessions"] == 1, "one session")
            assert _connectivity(rest, dev["id"])["online"] is True
    wait_until(lambda: _connectivity(rest, dev["id"])["sessions"] == 0, "no session")


def test_devices_behind_a_gateway_are_online_while_the_gateway_speaks_for_them(
    srv: RunningServer, rest: httpx.Client
) -> None:
    gateway = new_device(rest, f"state-gateway-{next(_names)}", gateway=True)
    name = f"state-child-{next(_names)}"
    with device_client(srv.mqtt_port, gateway["access_token"]) as gw:
        assert gw.publish("v1/gateway/connect", {"device": name}).value == 0
        found = rest.get("/api/v1/devices", params={"text_search": name}).json()["data"]
        (child,) = [d for d in found if d["name"] == name]
        state = _connectivity(rest, child["id"])
        assert (state["online"], state["transport"], state["sessions"]) == (True, "gateway", 1)
        telemetry = {name: [{"ts": 1_700_000_000_000, "values": {"t": 1}}]}
        assert gw.publish("v1/gateway/telemetry", telemetry).value == 0
        assert _connectivity(rest, child["id"])["last_activity_ts"] >= state["last_activity_ts"]
        assert gw.publish("v1/gateway/disconnect", {"device": name}).value == 0
        assert _connectivity(rest, child["id"])["sessions"] == 0
        assert gw.publish("v1/gateway/connect", {"device": name}).value == 0
        assert _connectivity(rest, child["id"])["sessions"] == 1
        assert _connectivity(rest, gateway["id"])["transport"] == "mqtt"
    # The gateway's connection ended: so did its children's sessions.
    wait_until(lambda: _connectivity(rest, child["id"])["sessions"] == 0, "child offline")


def test_persistent_rpc_to_a_child_is_delivered_through_its_gateway(
    srv: RunningServer, rest: httpx.Client
) -> None:
    gateway = new_device(rest, f"state-gateway-{next(_names)}", gateway=True)
    name = f"state-child-{next(_names)}"
    with device_client(srv.mqtt_port, gateway["access_token"]) as gw:
        assert gw.publish("v1/gateway/connect", {"device": name}).value == 0
    found = rest.get("/api/v1/devices", params={"text_search": name}).json()["data"]
    (child,) = [d for d in found if d["name"] == name]
    rpc_id = _post_rpc(rest, child["id"], {"method": "open", "persistent": True})["rpcId"]
    with device_client(srv.mqtt_port, gateway["access_token"]) as gw:
        gw.subscribed("v1/gateway/rpc")
        request = gw.expect_json("v1/gateway/rpc")
        assert request == {
            "device": name,
            "data": {"id": rpc_id, "method": "open", "params": {}},
        }
        reply = {"device": name, "id": rpc_id, "data": {"ok": True}}
        assert gw.publish("v1/gateway/rpc", reply).value == 0
    record = _rpc(rest, child["id"], rpc_id)
    assert (record["status"], record["response"]) == ("SUCCESSFUL", {"ok": True})


def test_queued_request_outlives_a_platform_restart(data_dir: Path, tmp_path: Path) -> None:
    server = start_server(data_dir, tmp_path / "logs-1")
    try:
        with server.admin() as rest:
            dev = new_device(rest, "restart-device")
            with device_client(server.mqtt_port, dev["access_token"]):
                pass  # seen once before the restart, not subscribed to RPC
            body = {"method": "calibrate", "params": [1, 2], "persistent": True}
            rpc_id = _post_rpc(rest, dev["id"], body)["rpcId"]
            wait_until(lambda: _connectivity(rest, dev["id"])["sessions"] == 0, "no session")
            before = _connectivity(rest, dev["id"])
    finally:
        assert server.stop() == 0
    server = start_server(data_dir, tmp_path / "logs-2")
    try:
        with server.admin() as rest:  # what was known of the device is not forgotten
            assert _connectivity(rest, dev["id"]) == before
            assert before["last_connect_ts"] > 0
        with (
            server.admin() as rest,
            device_client(server.mqtt_port, dev["access_token"], V5) as client,
        ):
            assert _rpc(rest, dev["id"], rpc_id)["status"] == "QUEUED"
            client.subscribed(RPC_REQUESTS)
            request_id, request = _answer_one(client, {"done": True})
            assert (request_id, request["method"], request["params"]) == (
                rpc_id,
                "calibrate",
                [1, 2],
            )
            assert _rpc(rest, dev["id"], rpc_id)["status"] == "SUCCESSFUL"
            # Ids keep growing across the restart.
            assert _post_rpc(rest, dev["id"], body)["rpcId"] == rpc_id + 1
    finally:
        assert server.stop() == 0
