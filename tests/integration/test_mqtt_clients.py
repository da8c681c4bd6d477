"""Third-party MQTT clients against a real `iotmesh run`: aiomqtt, the Mosquitto command
line tools, and ThingsBoard's own device SDK (tb-mqtt-client)."""

from __future__ import annotations

import asyncio
import itertools
import json
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import aiomqtt
import httpx
import pytest
from tb_device_mqtt import TBDeviceMqttClient, TBPublishInfo

from tests.integration.mqtt_helpers import (
    HOST,
    T0,
    WAIT_S,
    attributes,
    module_server,
    new_device,
    points,
    set_shared,
    wait_until,
)
from tests.integration.server import RunningServer

TELEMETRY = "v1/devices/me/telemetry"
ATTRIBUTES = "v1/devices/me/attributes"

_names = itertools.count()


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with module_server(tmp_path_factory, "mqtt-clients") as server:
        yield server


@pytest.fixture
def dev(rest: httpx.Client) -> dict[str, Any]:
    return new_device(rest, f"client-device-{next(_names)}")


# -- aiomqtt ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "protocol", [aiomqtt.ProtocolVersion.V311, aiomqtt.ProtocolVersion.V5], ids=["v311", "v5"]
)
async def test_aiomqtt_telemetry_and_shared_attribute_push(
    srv: RunningServer, dev: dict[str, Any], protocol: aiomqtt.ProtocolVersion
) -> None:
    headers = {"Authorization": f"Bearer {srv.admin_token}"}
    async with (
        httpx.AsyncClient(base_url=srv.url, headers=headers, timeout=30) as rest,
        aiomqtt.Client(
            HOST, srv.mqtt_port, username=dev["access_token"], protocol=protocol, timeout=WAIT_S
        ) as client,
        asyncio.timeout(30),
    ):
        payload = [{"ts": T0 + i, "values": {"temp": 20 + i}} for i in range(3)]
        await client.publish(TELEMETRY, json.dumps(payload), qos=1)  # returns on PUBACK
        r = await rest.get(
            f"/api/v1/devices/{dev['id']}/telemetry",
            params={"keys": "temp", "start_ts": T0, "end_ts": T0 + 10, "order": "ASC"},
        )
        assert r.json() == {"temp": [{"ts": T0 + i, "value": 20 + i} for i in range(3)]}

        await client.subscribe(ATTRIBUTES, qos=1)  # returns on SUBACK
        r = await rest.post(
            f"/api/v1/devices/{dev['id']}/attributes",
            params={"scope": "SHARED"},
            json={"setpoint": 21.5},
        )
        assert r.status_code == 200, r.text
        async for message in client.messages:
            assert message.topic.matches(ATTRIBUTES)
            assert isinstance(message.payload, bytes)
            assert json.loads(message.payload) == {"setpoint": 21.5}
            break


# -- mosquitto_pub / mosquitto_sub --------------------------------------------------------------


@pytest.mark.parametrize("version", ["mqttv311", "mqttv5"])
def test_mosquitto_pub_stores_telemetry(
    srv: RunningServer, rest: httpx.Client, dev: dict[str, Any], version: str
) -> None:
    message = json.dumps({"ts": T0, "values": {"humidity": 55}})
    cmd = ["mosquitto_pub", "-h", HOST, "-p", str(srv.mqtt_port), "-V", version]
    cmd += ["-u", dev["access_token"], "-q", "1", "-t", TELEMETRY, "-m", message]
    done = subprocess.run(cmd, capture_output=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    # mosquitto_pub exits after the PUBACK: the point is stored by now.
    assert points(rest, dev["id"], "humidity") == [{"ts": T0, "value": 55}]


def test_mosquitto_pub_with_a_wrong_token_fails(srv: RunningServer) -> None:
    cmd = ["mosquitto_pub", "-h", HOST, "-p", str(srv.mqtt_port), "-V", "mqttv311"]
    cmd += ["-u", "not-a-token", "-q", "1", "-t", TELEMETRY, "-m", '{"x": 1}']
    done = subprocess.run(cmd, capture_output=True, timeout=30, check=False)
    assert done.returncode != 0
    assert b"not authori" in done.stderr.lower()


@pytest.mark.parametrize("version", ["mqttv311", "mqttv5"])
def test_mosquitto_sub_receives_a_shared_attribute(
    srv: RunningServer, rest: httpx.Client, dev: dict[str, Any], version: str
) -> None:
    cmd = ["mosquitto_sub", "-h", HOST, "-p", str(srv.mqtt_port), "-V", version]
    cmd += ["-u", dev["access_token"], "-t", ATTRIBUTES, "-C", "1", "-W", "10"]
    sub = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        # We cannot see when its SUBSCRIBE was handled: set the attribute again (a new
        # value each time) until mosquitto_sub got one and exited (-C 1).
        for attempt in range(100):
            set_shared(rest, dev["id"], {"firmware": f"v{attempt}"})
            try:
                sub.wait(0.2)
                break
            except subprocess.TimeoutExpired:
                continue
        out, err = sub.communicate(timeout=15)
    finally:
        if sub.poll() is None:
            sub.kill()
            sub.communicate(timeout=5)
    assert sub.returncode == 0, err
    received = json.loads(out)
    assert list(received) == ["firmware"]
    assert received["firmware"].startswith("v")


# -- tb-mqtt-client (ThingsBoard's device SDK) ------------------------------------------------


@pytest.fixture
def tb(srv: RunningServer, dev: dict[str, Any]) -> Iterator[TBDeviceMqttClient]:
    """A connected TBDeviceMqttClient (MQTT v5, as the SDK speaks it)."""
    client = TBDeviceMqttClient(HOST, port=srv.mqtt_port, username=dev["access_token"])
    try:
        client.connect(min_reconnect_delay=1, timeout=30)
        wait_until(client.is_connected, "tb-mqtt-client connected")
        # The SDK asks for its session limits (client-side RPC getSessionLimits) right
        # after connecting; wait until it has them, so the session is settled.
        wait_until(lambda: client.rate_limits_received, "tb-mqtt-client session limits")
        yield client
    finally:
        client.stop()
        client.disconnect()


def test_tb_client_telemetry_and_attribute_request(
    tb: TBDeviceMqttClient, rest: httpx.Client, dev: dict[str, Any]
) -> None:
    result = tb.send_telemetry({"ts": T0, "values": {"voltage": 3.3}})
    assert result.get() == TBPublishInfo.TB_ERR_SUCCESS
    result = tb.send_telemetry([{"ts": T0 + 1, "values": {"voltage": 3.4}}, {"current": 0.5}])
    assert result.get() == TBPublishInfo.TB_ERR_SUCCESS
    # get() waits only 1 s for the PUBACK: look (bounded) rather than assume it came.
    expected = [{"ts": T0, "value": 3.3}, {"ts": T0 + 1, "value": 3.4}]
    wait_until(lambda: points(rest, dev["id"], "voltage") == expected, "tb telemetry stored")
    wait_until(lambda: points(rest, dev["id"], "current"), "tb telemetry at server time")

    assert tb.send_attributes({"fw": "2.0", "serial": "A-1"}).get() == 0
    wait_until(lambda: attributes(rest, dev["id"], "CLIENT").get("fw") == "2.0", "client attrs")
    set_shared(rest, dev["id"], {"interval": 30, "unused": True})

    answers: list[tuple[Any, Any]] = []
    answered = threading.Event()

    def on_attributes(content: Any, error: Any) -> None:
        answers.append((content, error))
        answered.set()

    tb.request_attributes(client_keys=["fw"], shared_keys=["interval"], callback=on_attributes)
    assert answered.wait(WAIT_S), "attribute request not answered"
    assert answers == [({"client": {"fw": "2.0"}, "shared": {"interval": 30}}, None)]


def test_tb_client_attribute_subscription_and_server_side_rpc(
    tb: TBDeviceMqttClient, srv: RunningServer, rest: httpx.Client, dev: dict[str, Any]
) -> None:
    pushed: list[Any] = []
    got_push = threading.Event()

    def on_change(content: Any, error: Any) -> None:
        pushed.append(content)
        got_push.set()

    tb.subscribe_to_all_attributes(on_change)
    set_shared(rest, dev["id"], {"led": "on"})
    assert got_push.wait(WAIT_S), "shared attribute change not pushed"
    assert pushed == [{"led": "on"}]

    requests: list[tuple[str, Any]] = []

    def on_rpc(request_id: str, request: Any) -> None:
        requests.append((request_id, request))
        tb.send_rpc_reply(request_id, {"echo": request["params"], "by": "tb-mqtt-client"})

    tb.set_server_side_rpc_request_handler(on_rpc)
    with srv.admin() as admin:
        r = admin.post(
            f"/api/v1/devices/{dev['id']}/rpc",
            json={"method": "echo", "params": {"n": 7}, "timeout_ms": 10_000},
        )
    assert r.status_code == 200, r.text
    assert r.json() == {"echo": {"n": 7}, "by": "tb-mqtt-client"}
    assert [req for _, req in requests] == [{"method": "echo", "params": {"n": 7}}]
