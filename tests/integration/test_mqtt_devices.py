"""The ThingsBoard device API over MQTT, spoken by paho-mqtt (v3.1.1 and v5) to a real
`iotmesh run`: telemetry, attributes, RPC both ways, and what the server refuses."""

from __future__ import annotations

import itertools
import json
import time
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
    connect_packet,
    device_client,
    module_server,
    new_device,
    points,
    publish_packet,
    raw_socket,
    read_packet,
    rpc_call,
    set_shared,
    telemetry_keys,
    wait_until,
)
from tests.integration.server import RunningServer

TELEMETRY = "v1/devices/me/telemetry"
ATTRIBUTES = "v1/devices/me/attributes"
RPC_REQUESTS = "v1/devices/me/rpc/request/+"

NOT_AUTHORIZED = 0x87
PAYLOAD_FORMAT_INVALID = 0x99
SUBSCRIBE_FAILURE = 0x80
TOPIC_NAME_INVALID = 0x90

_names = itertools.count()


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """One server for the module: every test registers its own device."""
    with module_server(tmp_path_factory, "mqtt-devices") as server:
        yield server


@pytest.fixture
def dev(rest: httpx.Client) -> dict[str, Any]:
    return new_device(rest, f"mqtt-device-{next(_names)}")


@pytest.fixture(params=VERSIONS, ids=VERSION_IDS)
def version(request: pytest.FixtureRequest) -> int:
    value: int = request.param
    return value


@pytest.fixture
def client(srv: RunningServer, dev: dict[str, Any], version: int) -> Iterator[PahoClient]:
    """`dev`, connected over MQTT with its token as user name."""
    with device_client(srv.mqtt_port, dev["access_token"], version) as c:
        yield c


def test_telemetry_every_form_at_every_qos_is_stored_once_acked(
    client: PahoClient, rest: httpx.Client, dev: dict[str, Any]
) -> None:
    dev_id = dev["id"]
    for qos in (1, 2):
        base = T0 + qos * 1000
        # {"ts": .., "values": {..}}
        rc = client.publish(TELEMETRY, {"ts": base, "values": {f"single{qos}": qos}}, qos)
        assert rc.value == 0
        assert points(rest, dev_id, f"single{qos}") == [{"ts": base, "value": qos}]
        # [ {..}, {..} ] with explicit ts
        batch = [{"ts": base + i, "values": {f"arr{qos}": i, "s": f"q{qos}-{i}"}} for i in range(5)]
        assert client.publish(TELEMETRY, batch, qos).value == 0
        assert points(rest, dev_id, f"arr{qos}") == [{"ts": base + i, "value": i} for i in range(5)]
        # {"k": v} at server time
        before = int(time.time() * 1000)
        assert client.publish(TELEMETRY, {f"plain{qos}": 1.5, "flag": True}, qos).value == 0
        after = int(time.time() * 1000)
        (point,) = points(rest, dev_id, f"plain{qos}")
        assert point["value"] == 1.5
        assert before - 60_000 <= point["ts"] <= after + 60_000  # server clock, same host
    s_values = [p["value"] for p in points(rest, dev_id, "s")]
    assert s_values == [f"q1-{i}" for i in range(5)] + [f"q2-{i}" for i in range(5)]
    assert [p["value"] for p in points(rest, dev_id, "flag")] == [True, True]

    # QoS 0 has no ack: the points must show up, within a bound.
    for i in range(3):
        client.publish(TELEMETRY, {"ts": T0 + i, "values": {"zero": i}}, qos=0)
    expected = [{"ts": T0 + i, "value": i} for i in range(3)]
    wait_until(lambda: points(rest, dev_id, "zero") == expected, "QoS 0 telemetry stored")


def test_pipelined_publishes_are_acked_in_order_and_stored(
    client: PahoClient, rest: httpx.Client, dev: dict[str, Any], version: int
) -> None:
    """Many QoS 1/2 messages in flight at once (several per socket read on the server)."""
    count = 300
    bad = {100, 200} if version == V5 else set()  # v3.1.1 would be disconnected
    mids = []
    for i in range(count):
        payload = b'{"broken"' if i in bad else json.dumps({"ts": T0 + i, "values": {"p": i}})
        mids.append(client.publish_nowait(TELEMETRY, payload, qos=1))
    wait_until(lambda: len(client.acks) >= count, f"{count} PUBACKs", timeout=30)
    assert list(client.acks) == mids  # acknowledged in the order they were sent
    for i, mid in enumerate(mids):
        assert client.acks[mid].value == (PAYLOAD_FORMAT_INVALID if i in bad else 0), i
    stored = points(rest, dev["id"], "p")
    assert stored == [{"ts": T0 + i, "value": i} for i in range(count) if i not in bad]

    for i in range(count, count + 100):
        client.publish_nowait(TELEMETRY, json.dumps({"ts": T0 + i, "values": {"p": i}}), qos=2)
    wait_until(lambda: len(client.acks) >= count + 100, "100 PUBCOMPs", timeout=30)
    assert [p["ts"] for p in points(rest, dev["id"], "p")][-100:] == [
        T0 + i for i in range(count, count + 100)
    ]


def test_same_key_and_ts_again_replaces_the_value(
    client: PahoClient, rest: httpx.Client, dev: dict[str, Any]
) -> None:
    assert client.publish(TELEMETRY, {"ts": T0, "values": {"k": 1}}).value == 0
    assert client.publish(TELEMETRY, {"ts": T0, "values": {"k": "two"}}).value == 0
    assert points(rest, dev["id"], "k") == [{"ts": T0, "value": "two"}]


def test_client_attributes_and_attribute_request(
    client: PahoClient, rest: httpx.Client, dev: dict[str, Any]
) -> None:
    assert client.publish(ATTRIBUTES, {"fw": "1.2", "n": 3, "cfg": {"a": [1]}}).value == 0
    assert attributes(rest, dev["id"], "CLIENT") == {"fw": "1.2", "n": 3, "cfg": {"a": [1]}}
    assert attributes(rest, dev["id"], "SHARED") == {}
    set_shared(rest, dev["id"], {"target": 21, "mode": "eco"})

    client.subscribed("v1/devices/me/attributes/response/+")
    request = {"clientKeys": "fw,n", "sharedKeys": "target"}
    assert client.publish("v1/devices/me/attributes/request/1", request).value == 0
    answer = client.expect_json("v1/devices/me/attributes/response/1")
    assert answer == {"client": {"fw": "1.2", "n": 3}, "shared": {"target": 21}}

    # No keys named: everything of both scopes.
    assert client.publish("v1/devices/me/attributes/request/2", {}).value == 0
    answer = client.expect_json("v1/devices/me/attributes/response/2")
    assert answer == {
        "client": {"fw": "1.2", "n": 3, "cfg": {"a": [1]}},
        "shared": {"target": 21, "mode": "eco"},
    }


def test_shared_attribute_change_is_pushed(
    client: PahoClient, rest: httpx.Client, dev: dict[str, Any]
) -> None:
    client.subscribed(ATTRIBUTES)
    set_shared(rest, dev["id"], {"targetTemperature": 22.5})
    assert client.expect_json(ATTRIBUTES) == {"targetTemperature": 22.5}
    set_shared(rest, dev["id"], {"mode": "away", "targetTemperature": 18})
    assert client.expect_json(ATTRIBUTES) == {"mode": "away", "targetTemperature": 18}
    r = rest.delete(
        f"/api/v1/devices/{dev['id']}/attributes", params={"scope": "SHARED", "keys": "mode"}
    )
    assert r.json() == {"deleted": 1}
    assert client.expect_json(ATTRIBUTES) == {"deleted": ["mode"]}


def test_server_side_rpc_round_trip(
    srv: RunningServer, client: PahoClient, dev: dict[str, Any]
) -> None:
    client.subscribed(RPC_REQUESTS)
    body = {"method": "setValve", "params": {"open": 40}, "timeout_ms": 10_000}
    with rpc_call(srv, dev["id"], body) as call:
        request = client.expect(RPC_REQUESTS)
        request_id = request.topic.rsplit("/", 1)[1]
        assert json.loads(request.payload) == {"method": "setValve", "params": {"open": 40}}
        reply = {"valve": 40, "ok": True}
        assert client.publish(f"v1/devices/me/rpc/response/{request_id}", reply).value == 0
        response = call.result(timeout=20)
    assert response.status_code == 200, response.text
    assert response.json() == reply


def _assert_rpc_timed_out(response: httpx.Response) -> None:
    assert response.status_code == 504, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["status"] == 504
    assert problem["title"] == "Gateway Timeout"


def test_rpc_to_a_device_that_never_subscribes_times_out(
    srv: RunningServer, client: PahoClient, dev: dict[str, Any], rest: httpx.Client
) -> None:
    body = {"method": "reboot", "params": {}, "timeout_ms": 500}
    with rpc_call(srv, dev["id"], body) as call:
        _assert_rpc_timed_out(call.result(timeout=20))
    offline = new_device(rest, f"mqtt-offline-{next(_names)}")
    with rpc_call(srv, offline["id"], body) as call:
        _assert_rpc_timed_out(call.result(timeout=20))


def test_one_way_rpc_is_delivered_and_answered_at_once(
    srv: RunningServer, client: PahoClient, dev: dict[str, Any]
) -> None:
    client.subscribed(RPC_REQUESTS)
    body = {"method": "blink", "params": {"times": 3}, "oneway": True, "timeout_ms": 10_000}
    with rpc_call(srv, dev["id"], body) as call:
        response = call.result(timeout=20)
    assert response.status_code == 200, response.text
    assert response.json() == {}
    assert client.expect_json(RPC_REQUESTS) == {"method": "blink", "params": {"times": 3}}


def test_rpc_after_the_device_unsubscribed_times_out(
    srv: RunningServer, client: PahoClient, dev: dict[str, Any]
) -> None:
    client.subscribed(RPC_REQUESTS)
    client.unsubscribe(RPC_REQUESTS)
    body = {"method": "reboot", "params": {}, "timeout_ms": 500}
    with rpc_call(srv, dev["id"], body) as call:
        _assert_rpc_timed_out(call.result(timeout=20))


def test_rpc_reaches_the_connection_that_is_still_subscribed(
    srv: RunningServer, dev: dict[str, Any], version: int
) -> None:
    token = dev["access_token"]
    with (
        device_client(srv.mqtt_port, token, version) as listening,
        device_client(srv.mqtt_port, token, version) as leaving,
    ):
        listening.subscribed(RPC_REQUESTS)
        leaving.subscribed(RPC_REQUESTS)
        leaving.unsubscribe(RPC_REQUESTS)
        body = {"method": "ping", "params": {}, "timeout_ms": 10_000}
        with rpc_call(srv, dev["id"], body) as call:
            wait_until(lambda: call.done() or listening.messages, "the request, or the call's end")
            if not call.done():
                request = listening.expect(RPC_REQUESTS)
                request_id = request.topic.rsplit("/", 1)[1]
                listening.publish(f"v1/devices/me/rpc/response/{request_id}", {"pong": 1})
            response = call.result(timeout=20)
    assert response.status_code == 200, response.text
    assert response.json() == {"pong": 1}


def test_client_side_rpc_get_current_time(client: PahoClient) -> None:
    client.subscribed("v1/devices/me/rpc/response/+")
    before = int(time.time() * 1000)
    request = {"method": "getCurrentTime", "params": {}}
    assert client.publish("v1/devices/me/rpc/request/7", request).value == 0
    answer = client.expect_json("v1/devices/me/rpc/response/7")
    after = int(time.time() * 1000)
    assert set(answer) == {"time"}
    assert isinstance(answer["time"], int)
    assert before - 60_000 <= answer["time"] <= after + 60_000  # server clock, same host

    assert client.publish("v1/devices/me/rpc/request/8", {"method": "ping"}).value == 0
    assert client.expect_json("v1/devices/me/rpc/response/8") == {"pong": True}
    assert client.publish("v1/devices/me/rpc/request/9", {"method": "nope"}).value == 0
    answer = client.expect_json("v1/devices/me/rpc/response/9")
    assert set(answer) == {"error"}
    assert "nope" in answer["error"]


@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_wrong_token_is_refused(srv: RunningServer, version: int) -> None:
    with PahoClient(srv.mqtt_port, "not-a-token", version=version) as c:
        rc = c.connect()
        # paho reports v3.1.1 return code 5 as the v5 reason 0x87 "Not authorized".
        assert rc.value == NOT_AUTHORIZED, rc
        c.wait_disconnected()


def test_wrong_token_v311_connack_bytes(srv: RunningServer) -> None:
    with raw_socket(srv.mqtt_port) as sock:
        sock.sendall(connect_packet("raw-wrong", username="not-a-token"))
        assert read_packet(sock) == (0x20, b"\x00\x05")  # CONNACK, return code 5
        assert read_packet(sock) is None  # then the server closes


def test_empty_client_id_needs_a_clean_session(srv: RunningServer, dev: dict[str, Any]) -> None:
    login = connect_packet("", username=dev["access_token"], clean=False)
    with raw_socket(srv.mqtt_port) as sock:
        sock.sendall(login)
        assert read_packet(sock) == (0x20, b"\x00\x02")  # identifier rejected
        assert read_packet(sock) is None


def test_v5_malformed_telemetry_gets_0x99_and_connection_stays_usable(
    srv: RunningServer, rest: httpx.Client, dev: dict[str, Any]
) -> None:
    with device_client(srv.mqtt_port, dev["access_token"], V5) as c:
        assert c.publish(TELEMETRY, b'{"bad": 1', qos=1).value == PAYLOAD_FORMAT_INVALID
        assert c.publish(TELEMETRY, b"\xff\xfe", qos=1).value == PAYLOAD_FORMAT_INVALID
        null_value = {"ts": T0, "values": {"bad": None}}
        assert c.publish(TELEMETRY, null_value, qos=1).value == PAYLOAD_FORMAT_INVALID
        assert c.publish(ATTRIBUTES, b'["not", "an object"]').value == PAYLOAD_FORMAT_INVALID
        assert c.publish(TELEMETRY, {"ts": T0, "values": {"good": 1}}, qos=1).value == 0
        assert not c.disconnects
    # QoS 2: the refusal is in the PUBREC, which paho does not report; read it raw.
    with raw_socket(srv.mqtt_port) as sock:
        sock.sendall(connect_packet("", version=V5, username=dev["access_token"]))
        connack = read_packet(sock)
        assert connack is not None
        assert connack[1][1] == 0
        sock.sendall(publish_packet(TELEMETRY, b"[]", version=V5, qos=2, packet_id=9))
        pubrec = read_packet(sock)
        assert pubrec is not None
        assert pubrec[0] == 0x50
        assert pubrec[1][:3] == b"\x00\x09\x99"
    assert telemetry_keys(rest, dev["id"]) == ["good"]
    assert attributes(rest, dev["id"], "CLIENT") == {}


def test_v311_malformed_telemetry_closes_the_connection(
    srv: RunningServer, rest: httpx.Client, dev: dict[str, Any]
) -> None:
    with device_client(srv.mqtt_port, dev["access_token"], V311) as c:
        c.publish_nowait(TELEMETRY, b'{"bad": 1', qos=1)
        c.wait_disconnected()
        assert not c.acks
    assert telemetry_keys(rest, dev["id"]) == []


def test_topic_outside_the_device_api_is_refused(client: PahoClient, version: int) -> None:
    codes = client.subscribe("other/topic", qos=1)
    assert [c.value for c in codes] == [SUBSCRIBE_FAILURE]
    rc = client.publish("other/topic", b"hello", qos=1)
    if version == V5:
        assert rc.value == NOT_AUTHORIZED
    # Either way the connection is still good for the device API.
    assert client.publish(TELEMETRY, {"ts": T0, "values": {"after": 1}}).value == 0
    assert not client.disconnects


def test_unknown_device_api_topic(srv: RunningServer, dev: dict[str, Any], version: int) -> None:
    with device_client(srv.mqtt_port, dev["access_token"], version) as c:
        if version == V5:
            assert c.publish("v1/devices/me/unknown", b"{}").value == TOPIC_NAME_INVALID
            assert c.publish(TELEMETRY, {"ts": T0, "values": {"after": 1}}).value == 0
        else:
            c.publish_nowait("v1/devices/me/unknown", b"{}")
            c.wait_disconnected()  # no negative ack in v3.1.1: the connection is closed
