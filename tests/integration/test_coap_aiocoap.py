"""The CoAP device API spoken by aiocoap's client to a real `iotmesh run`: CBOR,
Accept, RPC over Observe, NON, and every refusal (4.00, 4.01, 4.04, 4.05, 4.06, 4.13,
4.15, 4.29) while the server keeps serving others."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Iterator
from typing import Any

import aiocoap
import cbor2
import httpx
import pytest
from aiocoap import Message
from aiocoap.numbers.codes import Code

from tests.integration.coap_helpers import aiocoap_client, coap_url, request
from tests.integration.mqtt_helpers import (
    attributes,
    module_server,
    new_device,
    points,
    rpc_call,
    set_shared,
)
from tests.integration.server import RunningServer

JSON, CBOR = 50, 60
PER_DEVICE = 2  # IOTMESH_COAP__MAX_OBSERVATIONS_PER_DEVICE below
MAX_PAYLOAD = 2048

_names = itertools.count()


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    env = {
        "IOTMESH_COAP__MAX_OBSERVATIONS_PER_DEVICE": str(PER_DEVICE),
        "IOTMESH_COAP__MAX_PAYLOAD_BYTES": str(MAX_PAYLOAD),
    }
    with module_server(tmp_path_factory, "coap-aiocoap", env=env) as server:
        yield server


@pytest.fixture
def dev(rest: httpx.Client) -> dict[str, Any]:
    return new_device(rest, f"coap-aiocoap-{next(_names)}")


async def test_cbor_telemetry_and_cbor_answers(
    srv: RunningServer, rest: httpx.Client, dev: Any
) -> None:
    token = dev["access_token"]
    async with aiocoap_client() as ctx:
        body = cbor2.dumps({"ts": 1_700_000_000_000, "values": {"t": 1.5, "on": True}})
        r = await request(ctx, srv, token, "telemetry", payload=body, content_format=CBOR)
        assert r.code == Code.CHANGED, r
        assert [p["value"] for p in points(rest, dev["id"], "t")] == [1.5]
        r = await request(
            ctx, srv, token, "attributes", payload=cbor2.dumps({"fw": "2"}), content_format=CBOR
        )
        assert r.code == Code.CHANGED
        assert attributes(rest, dev["id"], "CLIENT") == {"fw": "2"}
        # GET with Accept: CBOR answers in CBOR.
        r = await request(ctx, srv, token, "attributes", code=Code.GET, accept=CBOR)
        assert r.code == Code.CONTENT
        assert int(r.opt.content_format) == CBOR
        assert cbor2.loads(r.payload) == {"client": {"fw": "2"}, "shared": {}}
        # Client-side RPC in CBOR is answered in CBOR; Accept JSON overrides.
        rpc = cbor2.dumps({"method": "ping", "params": {}})
        r = await request(ctx, srv, token, "rpc", payload=rpc, content_format=CBOR)
        assert cbor2.loads(r.payload) == {"pong": True}
        r = await request(ctx, srv, token, "rpc", payload=rpc, content_format=CBOR, accept=JSON)
        assert int(r.opt.content_format) == JSON
        assert json.loads(r.payload) == {"pong": True}


async def test_refusals_each_get_their_code(srv: RunningServer, dev: Any) -> None:
    token = dev["access_token"]
    async with aiocoap_client() as ctx:

        async def code_of(path: str, payload: bytes, **kw: Any) -> Code:
            response = await request(ctx, srv, token, path, payload=payload, **kw)
            return response.code

        r = await request(ctx, srv, "wrong-token", "telemetry", payload=b'{"t": 1}')
        assert r.code == Code.UNAUTHORIZED
        assert await code_of("telemetry", b"{nope") == Code.BAD_REQUEST
        assert await code_of("telemetry", b'{"t": null}') == Code.BAD_REQUEST
        assert await code_of("telemetry", b"\xa1\x61", content_format=CBOR) == Code.BAD_REQUEST
        assert await code_of("telemetry", b"\xa1\x01\x02", content_format=CBOR) == Code.BAD_REQUEST
        assert await code_of("telemetry", b"\x43abc", content_format=CBOR) == Code.BAD_REQUEST
        assert await code_of("telemetry", b"<t>1</t>", content_format=41) == (
            Code.UNSUPPORTED_CONTENT_FORMAT
        )
        assert await code_of("rpc", b'{"method": "ping"}', accept=41) == Code.NOT_ACCEPTABLE
        assert await code_of("elsewhere", b"{}") == Code.NOT_FOUND
        assert await code_of("rpc/abc", b"{}") == Code.BAD_REQUEST
        r = await request(ctx, srv, token, "telemetry", code=Code.GET)
        assert r.code == Code.METHOD_NOT_ALLOWED
        # Oversized: a body over coap.max_payload_bytes, or a Size1 announcing one.
        big = json.dumps({"blob": "x" * MAX_PAYLOAD}).encode()
        r = await request(ctx, srv, token, "telemetry", payload=big[:1000], size1=len(big))
        assert r.code == Code.REQUEST_ENTITY_TOO_LARGE
        assert r.opt.size1 == MAX_PAYLOAD
        # aiocoap's client sends a large body block-wise by itself: refused at the
        # block that crosses the limit.
        r = await request(ctx, srv, token, "telemetry", payload=big)
        assert r.code == Code.REQUEST_ENTITY_TOO_LARGE
        # ...and the server still serves the device.
        assert await code_of("telemetry", b'{"after": 1}') == Code.CHANGED


async def test_non_requests_get_non_answers(
    srv: RunningServer, rest: httpx.Client, dev: Any
) -> None:
    token = dev["access_token"]
    async with aiocoap_client() as ctx:
        r = await request(ctx, srv, token, "telemetry", payload=b'{"n": 1}', reliable=False)
        assert r.code == Code.CHANGED
        assert r.mtype == aiocoap.NON
        r = await request(ctx, srv, "wrong", "telemetry", payload=b'{"n": 2}', reliable=False)
        assert r.code == Code.UNAUTHORIZED
    assert [p["value"] for p in points(rest, dev["id"], "n")] == [1]


async def _observe(ctx: Any, srv: RunningServer, token: str, path: str, **kw: Any) -> Any:
    message = Message(code=Code.GET, uri=coap_url(srv, token, path), observe=0, **kw)
    return ctx.request(message)


async def test_rpc_over_observe_and_reply(srv: RunningServer, dev: Any) -> None:
    token = dev["access_token"]
    async with aiocoap_client() as ctx:
        observation = await _observe(ctx, srv, token, "rpc", accept=CBOR)
        first = await asyncio.wait_for(observation.response, 20)
        assert first.code == Code.CONTENT
        assert first.payload == b""
        call = {"method": "reboot", "params": {"delay": 3}, "timeout_ms": 10_000}
        with rpc_call(srv, dev["id"], call) as future:
            notification = await asyncio.wait_for(anext(aiter(observation.observation)), 20)
            sent = cbor2.loads(notification.payload)
            assert sent["method"] == "reboot"
            assert sent["params"] == {"delay": 3}
            reply = cbor2.dumps({"done": True})
            r = await request(
                ctx, srv, token, f"rpc/{sent['id']}", payload=reply, content_format=CBOR
            )
            assert r.code == Code.CHANGED
            response = await asyncio.to_thread(future.result, 20)
        assert response.status_code == 200, response.text
        assert response.json() == {"done": True}
        observation.observation.cancel()


async def test_observe_flood_refused_while_others_work(
    srv: RunningServer, rest: httpx.Client, dev: Any
) -> None:
    other = new_device(rest, f"coap-aiocoap-other-{next(_names)}")
    token = dev["access_token"]
    async with aiocoap_client() as ctx:
        held = []
        for _ in range(PER_DEVICE):
            observation = await _observe(ctx, srv, token, "attributes/updates")
            assert (await asyncio.wait_for(observation.response, 20)).code == Code.CONTENT
            held.append(observation)
        refused = []
        for _ in range(20):
            observation = await _observe(ctx, srv, token, "attributes")
            refused.append(await asyncio.wait_for(observation.response, 20))
        assert {r.code for r in refused} == {Code.TOO_MANY_REQUESTS}
        assert all(r.opt.max_age for r in refused)
        # Another device is served, observations included, and the held ones still work.
        r = await request(ctx, srv, other["access_token"], "telemetry", payload=b'{"ok": 1}')
        assert r.code == Code.CHANGED
        theirs = await _observe(ctx, srv, other["access_token"], "attributes")
        assert (await asyncio.wait_for(theirs.response, 20)).code == Code.CONTENT
        set_shared(rest, dev["id"], {"mode": "eco"})
        for observation in held:
            pushed = await asyncio.wait_for(anext(aiter(observation.observation)), 20)
            assert json.loads(pushed.payload) == {"mode": "eco"}
        for observation in [*held, theirs]:
            observation.observation.cancel()
    assert [p["value"] for p in points(rest, other["id"], "ok")] == [1]
