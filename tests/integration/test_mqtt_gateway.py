"""The ThingsBoard gateway API over MQTT (`v1/gateway/...`) on a real `iotmesh run`:
a gateway device speaks, with paho-mqtt, for child devices it names."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.integration.mqtt_helpers import (
    T0,
    V5,
    V311,
    VERSION_IDS,
    VERSIONS,
    PahoClient,
    attributes,
    device_client,
    module_server,
    new_device,
    points,
    rpc_call,
    set_shared,
)
from tests.integration.server import RunningServer

NOT_AUTHORIZED = 0x87

_names = itertools.count()


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with module_server(tmp_path_factory, "mqtt-gateway") as server:
        yield server


@pytest.fixture
def gw_device(rest: httpx.Client) -> dict[str, Any]:
    return new_device(rest, f"gateway-{next(_names)}", gateway=True)


@pytest.fixture(params=VERSIONS, ids=VERSION_IDS)
def gw(
    srv: RunningServer, gw_device: dict[str, Any], request: pytest.FixtureRequest
) -> Iterator[PahoClient]:
    """The gateway, connected with its token."""
    with device_client(srv.mqtt_port, gw_device["access_token"], request.param) as client:
        yield client


def _children(rest: httpx.Client, name: str) -> dict[str, dict[str, Any]]:
    """The devices named `name` (zero or one), by name."""
    r = rest.get("/api/v1/devices", params={"text_search": name, "page_size": 1000})
    assert r.status_code == 200, r.text
    return {d["name"]: d for d in r.json()["data"] if d["name"] == name}


def _child_name(label: str) -> str:
    """Device names are global: each test's children get their own."""
    return f"Child {label} {next(_names)}"


def test_connect_and_telemetry_create_children_and_store_their_data(
    gw: PahoClient, rest: httpx.Client, gw_device: dict[str, Any]
) -> None:
    a, b = _child_name("A"), _child_name("B")
    assert gw.publish("v1/gateway/connect", {"device": a}).value == 0
    assert set(_children(rest, a)) == {a}

    telemetry = {
        a: [{"ts": T0, "values": {"temp": 21.5}}, {"ts": T0 + 1, "values": {"temp": 22}}],
        b: [{"ts": T0 + 2, "values": {"hum": 40, "ok": True}}],
    }
    assert gw.publish("v1/gateway/telemetry", telemetry).value == 0
    children = {**_children(rest, a), **_children(rest, b)}
    assert set(children) == {a, b}
    for child in children.values():
        assert child["gateway_id"] == gw_device["id"]
        assert child["gateway"] is False
    assert points(rest, children[a]["id"], "temp") == [
        {"ts": T0, "value": 21.5},
        {"ts": T0 + 1, "value": 22},
    ]
    assert points(rest, children[b]["id"], "hum") == [{"ts": T0 + 2, "value": 40}]
    assert points(rest, children[b]["id"], "ok") == [{"ts": T0 + 2, "value": True}]
    # The gateway's own telemetry is untouched.
    assert rest.get(f"/api/v1/devices/{gw_device['id']}/telemetry/keys").json() == []


def test_child_attributes_and_attribute_request(gw: PahoClient, rest: httpx.Client) -> None:
    a = _child_name("A")
    assert gw.publish("v1/gateway/attributes", {a: {"fw": "1.0", "model": "T1"}}).value == 0
    (child,) = _children(rest, a).values()
    assert attributes(rest, child["id"], "CLIENT") == {"fw": "1.0", "model": "T1"}

    gw.subscribed("v1/gateway/attributes/response")
    request = {"id": 1, "device": a, "client": True, "key": "fw"}
    assert gw.publish("v1/gateway/attributes/request", request).value == 0
    assert gw.expect_json("v1/gateway/attributes/response") == {
        "id": 1,
        "device": a,
        "value": "1.0",
    }

    set_shared(rest, child["id"], {"interval": 5, "unit": "C"})
    request = {"id": 2, "device": a, "client": False, "keys": ["interval", "unit"]}
    assert gw.publish("v1/gateway/attributes/request", request).value == 0
    assert gw.expect_json("v1/gateway/attributes/response") == {
        "id": 2,
        "device": a,
        "values": {"interval": 5, "unit": "C"},
    }


def test_shared_attribute_of_a_child_is_pushed_to_the_gateway(
    gw: PahoClient, rest: httpx.Client
) -> None:
    a = _child_name("A")
    gw.subscribed("v1/gateway/attributes")
    assert gw.publish("v1/gateway/connect", {"device": a}).value == 0
    (child,) = _children(rest, a).values()
    set_shared(rest, child["id"], {"setpoint": 19})
    assert gw.expect_json("v1/gateway/attributes") == {"device": a, "data": {"setpoint": 19}}


def test_rpc_to_a_child_goes_through_the_gateway(
    gw: PahoClient, srv: RunningServer, rest: httpx.Client
) -> None:
    a = _child_name("A")
    gw.subscribed("v1/gateway/rpc")
    assert gw.publish("v1/gateway/connect", {"device": a}).value == 0
    (child,) = _children(rest, a).values()
    body = {"method": "setValve", "params": {"open": 25}, "timeout_ms": 10_000}
    with rpc_call(srv, child["id"], body) as call:
        request = gw.expect_json("v1/gateway/rpc")
        assert set(request) == {"device", "data"}
        assert request["device"] == a
        data = request["data"]
        assert (data["method"], data["params"]) == ("setValve", {"open": 25})
        assert isinstance(data["id"], int)
        reply = {"device": a, "id": data["id"], "data": {"valve": 25, "ok": True}}
        assert gw.publish("v1/gateway/rpc", reply).value == 0
        response = call.result(timeout=20)
    assert response.status_code == 200, response.text
    assert response.json() == {"valve": 25, "ok": True}


def test_a_plain_device_may_not_use_the_gateway_api(srv: RunningServer, rest: httpx.Client) -> None:
    plain = new_device(rest, f"not-a-gateway-{next(_names)}")
    a = _child_name("A")
    telemetry = {a: [{"ts": T0, "values": {"temp": 1}}]}
    with device_client(srv.mqtt_port, plain["access_token"], V5) as c:
        assert c.publish("v1/gateway/telemetry", telemetry).value == NOT_AUTHORIZED
        assert c.publish("v1/gateway/connect", {"device": a}).value == NOT_AUTHORIZED
        assert [code.value for code in c.subscribe("v1/gateway/rpc")] == [0x80]
        assert not c.disconnects
    with device_client(srv.mqtt_port, plain["access_token"], V311) as c:
        c.publish("v1/gateway/telemetry", telemetry)  # v3.1.1 cannot refuse an ack
    assert _children(rest, a) == {}
    assert rest.get(f"/api/v1/devices/{plain['id']}/telemetry/keys").json() == []


def test_a_gateway_cannot_write_for_a_device_that_is_not_behind_it(
    srv: RunningServer, rest: httpx.Client, gw_device: dict[str, Any]
) -> None:
    plain = new_device(rest, f"plain-{next(_names)}")
    other_gateway = new_device(rest, f"other-gateway-{next(_names)}", gateway=True)
    telemetry = {plain["name"]: [{"ts": T0, "values": {"forged": 1}}]}
    attrs = {other_gateway["name"]: {"forged": True}}
    with device_client(srv.mqtt_port, gw_device["access_token"], V5) as gw:
        rc_telemetry = gw.publish("v1/gateway/telemetry", telemetry)
        rc_attributes = gw.publish("v1/gateway/attributes", attrs)
    assert rest.get(f"/api/v1/devices/{plain['id']}/telemetry/keys").json() == []
    assert attributes(rest, other_gateway["id"], "CLIENT") == {}
    assert rc_telemetry.value >= 0x80
    assert rc_attributes.value >= 0x80
