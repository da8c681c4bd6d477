"""Pushes to devices across `iotmesh serve` instances, on NATS and on Redis: the state,
mqtt, coap and http roles as separate OS processes sharing one data dir and bus engine.

Through the REST API of the http instance:

- a shared attribute set, then deleted, reaches a paho-mqtt device on the mqtt
  instance (subscribed to `v1/devices/me/attributes`) and an aiocoap observer of the
  device's attributes on the coap instance;
- a two-way RPC call reaches the paho device, and the device's reply (given to the
  mqtt instance) comes back in the REST response;
- a persistent one-way request reaches the device, and ends SUCCESSFUL in the store.

No pipeline or writer: attributes and RPC live in the state store and the broadcasts
of the bus engine, not on the telemetry path.
"""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiocoap import Context, Message
from aiocoap.numbers.codes import Code

from tests.integration import cluster
from tests.integration.cluster import Instance
from tests.integration.coap_helpers import aiocoap_client
from tests.integration.mqtt_helpers import PahoClient, device_client, set_shared

ATTRIBUTES = "v1/devices/me/attributes"
RPC_REQUESTS = "v1/devices/me/rpc/request/+"
WAIT_S = 20.0  # upper bound of every wait: only reached when something hangs


async def _observe_attributes(ctx: Context, coap: Instance, token: str) -> Any:
    url = f"coap://127.0.0.1:{coap.coap_port}/api/v1/{token}/attributes"
    observation = ctx.request(Message(code=Code.GET, uri=url, observe=0))
    first = await asyncio.wait_for(observation.response, WAIT_S)
    assert first.code == Code.CONTENT
    return observation


async def _next_json(notifications: Any) -> Any:
    pushed = await asyncio.wait_for(anext(notifications), WAIT_S)
    return json.loads(pushed.payload)


def _rpc_status(admin: httpx.Client, device_id: str, rpc_id: int) -> str:
    r = admin.get(f"/api/v1/devices/{device_id}/rpc/{rpc_id}")
    assert r.status_code == 200, r.text
    status: str = r.json()["status"]
    return status


def _wait_status(admin: httpx.Client, device_id: str, rpc_id: int, wanted: str) -> None:
    deadline = time.monotonic() + WAIT_S
    status = _rpc_status(admin, device_id, rpc_id)
    while status != wanted and time.monotonic() < deadline:
        time.sleep(0.1)
        status = _rpc_status(admin, device_id, rpc_id)
    assert status == wanted


async def _attributes(
    admin: httpx.Client, device: dict[str, Any], mqtt_device: PahoClient, coap: Instance
) -> None:
    async with aiocoap_client() as ctx:
        observation = await _observe_attributes(ctx, coap, device["access_token"])
        notifications = aiter(observation.observation)
        await asyncio.to_thread(set_shared, admin, device["id"], {"targetTemperature": 22})
        assert await _next_json(notifications) == {"targetTemperature": 22}
        assert mqtt_device.expect_json(ATTRIBUTES, WAIT_S) == {"targetTemperature": 22}

        r = await asyncio.to_thread(
            admin.delete,
            f"/api/v1/devices/{device['id']}/attributes",
            params={"scope": "SHARED", "keys": "targetTemperature"},
        )
        assert r.status_code == 200, r.text
        assert r.json() == {"deleted": 1}
        assert await _next_json(notifications) == {"deleted": ["targetTemperature"]}
        assert mqtt_device.expect_json(ATTRIBUTES, WAIT_S) == {"deleted": ["targetTemperature"]}
        observation.observation.cancel()


def _rpc(admin: httpx.Client, device: dict[str, Any], mqtt_device: PahoClient) -> None:
    url = f"/api/v1/devices/{device['id']}/rpc"
    body = {"method": "getTemperature", "params": {"unit": "C"}, "timeout_ms": 15_000}
    with ThreadPoolExecutor(1, thread_name_prefix="rest-rpc") as pool:
        call = pool.submit(admin.post, url, json=body)
        request = mqtt_device.expect(RPC_REQUESTS, WAIT_S)
        assert json.loads(request.payload) == {"method": "getTemperature", "params": {"unit": "C"}}
        rpc_id = request.topic.rsplit("/", 1)[1]
        mqtt_device.publish(f"v1/devices/me/rpc/response/{rpc_id}", json.dumps({"t": 21.5}))
        answer = call.result(timeout=WAIT_S)
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"t": 21.5}
    assert _rpc_status(admin, device["id"], int(rpc_id)) == "SUCCESSFUL"

    body = {"method": "blink", "params": None, "oneway": True, "persistent": True}
    r = admin.post(url, json=body)
    assert r.status_code == 200, r.text
    request = mqtt_device.expect(RPC_REQUESTS, WAIT_S)
    assert json.loads(request.payload) == {"method": "blink", "params": None}
    assert request.topic.endswith(f"/{r.json()['rpcId']}")
    _wait_status(admin, device["id"], r.json()["rpcId"], "SUCCESSFUL")


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", ["nats", "redis"])
def test_attributes_and_rpc_reach_devices_on_other_instances(backend: str, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    logs = tmp_path / "logs"
    env = cluster.bus_env(backend, IOTMESH_LOG_LEVEL="warning")
    instances: list[Instance] = []
    try:
        # `state` first: it creates the state schema the others open.
        instances += cluster.start([("state", "1")], data_dir, logs, env)
        instances += cluster.start(
            [("mqtt", "1"), ("coap", "1"), ("http", "1")], data_dir, logs, env
        )
        _, mqtt, coap, http = instances
        with cluster.admin_client(data_dir, http.url) as admin:
            (device,) = cluster.create_devices(admin, 1, "pushed")
            with device_client(mqtt.mqtt_port, device["access_token"]) as mqtt_device:
                mqtt_device.subscribed(ATTRIBUTES)
                mqtt_device.subscribed(RPC_REQUESTS)
                asyncio.run(_attributes(admin, device, mqtt_device, coap))
                _rpc(admin, device, mqtt_device)
                time.sleep(0.2)  # would a second copy of anything follow?
                assert [m.topic for m in mqtt_device.messages] == []
        for instance in instances:
            out = instance.output()
            assert "Traceback" not in out, out
            assert " ERROR " not in out, out
    finally:
        for instance in reversed(instances):
            instance.stop()
        asyncio.run(cluster.delete_bus_data(env))
