"""ServiceHttp's retry rules, with httpx's mock transport as the network.

Real servers and a real kill are in tests/integration/test_cluster.py; here each
instance's behaviour is scripted to check which failures are retried for which method.
"""

from __future__ import annotations

import httpx
import msgspec
import pytest

from iotmesh.cluster import CallFailed, Discovery, Instance
from iotmesh.cluster.http import ServiceHttp
from iotmesh.core.settings import ClusterSettings
from tests.unit.cluster.test_discovery import FakeRegistry

SETTINGS = ClusterSettings(call_retries=2, retry_backoff_s=0.0)


async def mesh(behaviour: dict[str, str]) -> tuple[ServiceHttp, list[str]]:
    """Instances named by `behaviour`: 'ok', 'refuse', 'timeout', '503'."""
    registry = FakeRegistry()
    for name in behaviour:
        await registry.put(
            msgspec.structs.replace(
                Instance(service="api", instance_id=name, addresses=[f"http://{name}.test"]),
                seq=1,
            )
        )
    hits: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        name = request.url.host.split(".")[0]
        hits.append(name)
        what = behaviour[name]
        if what == "refuse":
            raise httpx.ConnectError("refused", request=request)
        if what == "timeout":
            raise httpx.ReadTimeout("slow", request=request)
        if what == "503":
            return httpx.Response(503, text=name)
        return httpx.Response(200, text=name)

    discovery = Discovery(registry, "api", SETTINGS)
    await discovery.refresh()
    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return ServiceHttp(discovery, client), hits


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_a_refused_connection_is_retried_elsewhere_for_any_method(method: str) -> None:
    http, _hits = await mesh({"a": "refuse", "b": "refuse", "c": "ok"})
    for _ in range(3):
        response = await http.request(method, "/x")
        assert response.text == "c"
    await http.client.aclose()


async def test_timeouts_and_503_are_retried_for_idempotent_methods() -> None:
    http, _hits = await mesh({"a": "timeout", "b": "503", "c": "ok"})
    for _ in range(3):
        assert (await http.get("/x")).text == "c"
    await http.client.aclose()


async def test_a_post_that_may_have_taken_effect_is_not_retried() -> None:
    http, hits = await mesh({"a": "timeout", "b": "503"})
    outcomes = set()
    for _ in range(4):
        try:
            response = await http.post("/x", json={})
            outcomes.add(response.status_code)  # the 503 comes back as it is
        except httpx.ReadTimeout:
            outcomes.add("timeout")
    assert outcomes == {503, "timeout"}
    assert len(hits) == 4  # one attempt per call
    await http.client.aclose()


async def test_every_instance_failing_is_call_failed() -> None:
    http, _hits = await mesh({"a": "503", "b": "503"})
    with pytest.raises(CallFailed) as caught:
        await http.get("/x")
    assert len(caught.value.attempts) == 2
    await http.client.aclose()
