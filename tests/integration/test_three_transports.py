"""One device, three transports (MQTT, CoAP, HTTP) on one `iotmesh run`: the device
state service is the same whichever protocol the device speaks.

- An RPC request made while the device is offline waits (persistent) and is delivered
  when the device shows up over CoAP; its reply completes the stored request.
- One shared attribute set over REST reaches, at the same time, an MQTT subscriber
  (paho-mqtt), a CoAP observer (aiocoap) and an HTTP long-poller (httpx).
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from aiocoap import Message
from aiocoap.numbers.codes import Code

from tests.integration.coap_helpers import aiocoap_client, coap_url, request
from tests.integration.mqtt_helpers import (
    device_client,
    module_server,
    new_device,
    set_shared,
    wait_until,
)
from tests.integration.server import RunningServer

ATTRIBUTES = "v1/devices/me/attributes"

_names = itertools.count()


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with module_server(tmp_path_factory, "three-transports") as server:
        yield server


@pytest.fixture
def dev(rest: httpx.Client) -> dict[str, Any]:
    return new_device(rest, f"three-{next(_names)}")


def _rpc_record(rest: httpx.Client, device_id: str, rpc_id: int) -> dict[str, Any]:
    r = rest.get(f"/api/v1/devices/{device_id}/rpc/{rpc_id}")
    assert r.status_code == 200, r.text
    record: dict[str, Any] = r.json()
    return record


async def test_rpc_made_while_offline_is_delivered_over_coap(
    srv: RunningServer, rest: httpx.Client, dev: dict[str, Any]
) -> None:
    body = {"method": "setLed", "params": {"on": True}, "persistent": True, "timeout_ms": 20_000}
    r = await asyncio.to_thread(rest.post, f"/api/v1/devices/{dev['id']}/rpc", json=body)
    assert r.status_code == 200, r.text
    rpc_id = r.json()["rpcId"]
    assert r.json()["status"] == "QUEUED"
    connectivity = f"/api/v1/devices/{dev['id']}/connectivity"
    assert (await asyncio.to_thread(rest.get, connectivity)).json()["online"] is False

    token = dev["access_token"]
    async with aiocoap_client() as ctx:
        observe = Message(code=Code.GET, uri=coap_url(srv, token, "rpc"), observe=0)
        observation = ctx.request(observe)
        first = await asyncio.wait_for(observation.response, 20)
        assert first.code == Code.CONTENT
        notification = await asyncio.wait_for(anext(aiter(observation.observation)), 20)
        sent = json.loads(notification.payload)
        assert sent == {"id": rpc_id, "method": "setLed", "params": {"on": True}}
        state = (await asyncio.to_thread(rest.get, connectivity)).json()
        assert state["online"] is True
        assert state["transport"] == "coap"

        reply = await request(ctx, srv, token, f"rpc/{rpc_id}", payload=b'{"led": "on"}')
        assert reply.code == Code.CHANGED
        observation.observation.cancel()

    # The 2.04 came after the reply was stored: no waiting needed.
    record = await asyncio.to_thread(_rpc_record, rest, dev["id"], rpc_id)
    assert record["status"] == "SUCCESSFUL"
    assert record["response"] == {"led": "on"}


async def test_shared_attribute_reaches_mqtt_coap_and_http_at_once(
    srv: RunningServer, rest: httpx.Client, dev: dict[str, Any]
) -> None:
    token = dev["access_token"]
    with (
        device_client(srv.mqtt_port, token) as mqtt_device,
        httpx.Client(base_url=srv.url, timeout=30) as http_device,
        ThreadPoolExecutor(1) as pool,
    ):
        mqtt_device.subscribed(ATTRIBUTES)
        poll = pool.submit(
            http_device.get, f"/api/v1/{token}/attributes/updates", params={"timeout": 20_000}
        )
        wait_until(
            lambda: rest.get("/api/v1/stats").json()["http"]["long_polls_attributes"] >= 1,
            "the HTTP long-poll to wait",
        )
        async with aiocoap_client() as ctx:
            observe = Message(code=Code.GET, uri=coap_url(srv, token, "attributes"), observe=0)
            observation = ctx.request(observe)
            first = await asyncio.wait_for(observation.response, 20)
            assert first.code == Code.CONTENT
            assert json.loads(first.payload or b"{}") == {}

            await asyncio.to_thread(set_shared, rest, dev["id"], {"targetTemperature": 22})

            pushed = await asyncio.wait_for(anext(aiter(observation.observation)), 20)
            assert json.loads(pushed.payload) == {"targetTemperature": 22}
            observation.observation.cancel()
        assert mqtt_device.expect_json(ATTRIBUTES) == {"targetTemperature": 22}
        answer = poll.result(timeout=20)
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"targetTemperature": 22}
