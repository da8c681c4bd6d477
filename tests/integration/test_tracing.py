"""Tracing: one device message is one trace, transport → bus → pipeline → writer.

In process (a `Platform` with an in-memory span exporter) so that the spans can be read;
the devices are real clients: aiomqtt over MQTT, httpx over HTTP.
"""

from __future__ import annotations

import contextlib
import itertools
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from iotmesh.app import Platform
from iotmesh.core.settings import Settings

PATH = ["bus.publish", "pipeline.handle", "storage.commit"]


class Traced:
    def __init__(self, platform: Platform, exporter: InMemorySpanExporter) -> None:
        self.platform = platform
        self.exporter = exporter
        assert platform.http is not None
        assert platform.mqtt is not None
        self.url = f"http://127.0.0.1:{platform.http.port}"
        self.mqtt_port = platform.mqtt.port

    async def device(self, name: str, gateway: bool = False) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.platform.admin_token}"}
        async with httpx.AsyncClient(base_url=self.url, headers=headers) as rest:
            r = await rest.post("/api/v1/devices", json={"name": name, "gateway": gateway})
            assert r.status_code == 201, r.text
            body: dict[str, Any] = r.json()
            return body

    def spans(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.exporter.get_finished_spans() if s.name == name]

    def trace(self, trace_id: int) -> dict[str, ReadableSpan]:
        """The spans of one trace by name (each name once)."""
        found: dict[str, ReadableSpan] = {}
        for span in self.exporter.get_finished_spans():
            assert span.context is not None
            if span.context.trace_id == trace_id:
                assert span.name not in found, f"two {span.name} spans in one trace"
                found[span.name] = span
        return found


def _parent_chain(spans: dict[str, ReadableSpan], names: list[str]) -> None:
    """Each span in `names` is the parent of the next."""
    for parent, child in itertools.pairwise(names):
        assert spans[child].parent is not None, child
        assert spans[parent].context is not None
        assert spans[child].parent.span_id == spans[parent].context.span_id, (parent, child)


@contextlib.asynccontextmanager
async def platform_tracing(path: Path, ratio: float) -> AsyncIterator[Traced]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    settings = Settings(
        data_dir=path,
        http={"port": 0},
        mqtt={"port": 0},
        coap={"port": 0},
        tracing={"enabled": True, "sample_ratio": ratio},
    )
    async with Platform(settings, tracer_provider=provider) as platform:
        yield Traced(platform, exporter)
    provider.shutdown()


@pytest.fixture
async def traced(tmp_path: Path) -> AsyncIterator[Traced]:
    async with platform_tracing(tmp_path, 1.0) as traced:
        yield traced


async def test_one_mqtt_message_is_one_trace_from_transport_to_storage(traced: Traced) -> None:
    dev = await traced.device("traced-mqtt")
    client = aiomqtt.Client("127.0.0.1", traced.mqtt_port, username=dev["access_token"])
    async with client:
        # QoS 1 returns after the PUBACK, which leaves only after the commit.
        await client.publish("v1/devices/me/telemetry", json.dumps({"t": 21.5}), qos=1)

    [root] = traced.spans("mqtt.publish")
    assert root.parent is None
    assert root.kind is SpanKind.SERVER
    assert root.attributes is not None
    assert root.attributes["iotmesh.device_id"] == dev["id"]
    assert root.context is not None
    spans = traced.trace(root.context.trace_id)
    assert set(spans) == {"mqtt.publish", *PATH}
    _parent_chain(spans, ["mqtt.publish", *PATH])
    assert spans["bus.publish"].kind is SpanKind.PRODUCER
    assert spans["pipeline.handle"].kind is SpanKind.CONSUMER
    commit = spans["storage.commit"].attributes
    assert commit is not None
    assert commit["iotmesh.commit.records"] >= 1
    assert all(s.status.is_ok for s in spans.values())


async def test_an_http_upload_continues_the_callers_trace(traced: Traced) -> None:
    dev = await traced.device("traced-http")
    trace_id = 0x0AF7651916CD43DD8448EB211C80319C
    caller_span = 0xB7AD6B7169203331
    header = f"00-{trace_id:032x}-{caller_span:016x}-01"
    async with httpx.AsyncClient(base_url=traced.url) as client:
        r = await client.post(
            f"/api/v1/{dev['access_token']}/telemetry",
            json={"ts": 1700000000000, "values": {"t": 1}},
            headers={"traceparent": header},
        )
    assert r.status_code == 200

    spans = traced.trace(trace_id)
    assert set(spans) == {"http.telemetry", *PATH}
    http_span = spans["http.telemetry"]
    assert http_span.parent is not None
    assert http_span.parent.span_id == caller_span
    assert http_span.parent.is_remote
    assert http_span.kind is SpanKind.SERVER
    _parent_chain(spans, ["http.telemetry", *PATH])


async def test_an_http_upload_without_traceparent_starts_a_trace(traced: Traced) -> None:
    dev = await traced.device("traced-http-root")
    async with httpx.AsyncClient(base_url=traced.url) as client:
        r = await client.post(f"/api/v1/{dev['access_token']}/telemetry", json={"t": 2})
    assert r.status_code == 200
    [root] = traced.spans("http.telemetry")
    assert root.parent is None
    assert root.context is not None
    assert set(traced.trace(root.context.trace_id)) == {"http.telemetry", *PATH}


async def test_a_refused_upload_is_an_error_span_and_reaches_no_bus(traced: Traced) -> None:
    dev = await traced.device("traced-bad")
    async with httpx.AsyncClient(base_url=traced.url) as client:
        r = await client.post(f"/api/v1/{dev['access_token']}/telemetry", content=b"{nope")
    assert r.status_code == 400
    [root] = traced.spans("http.telemetry")
    assert not root.status.is_ok
    assert traced.spans("bus.publish") == []


async def test_unsampled_messages_make_no_spans_but_a_sampled_caller_is_followed(
    tmp_path: Path,
) -> None:
    async with platform_tracing(tmp_path, 0.0) as traced:
        dev = await traced.device("not-sampled")
        client = aiomqtt.Client("127.0.0.1", traced.mqtt_port, username=dev["access_token"])
        async with client:
            await client.publish("v1/devices/me/telemetry", json.dumps({"t": 1}), qos=1)
        url = f"/api/v1/{dev['access_token']}/telemetry"
        async with httpx.AsyncClient(base_url=traced.url) as http:
            assert (await http.post(url, json={"t": 2})).status_code == 200
            assert traced.exporter.get_finished_spans() == ()
            trace_id = 0x1AF7651916CD43DD8448EB211C80319C
            header = f"00-{trace_id:032x}-b7ad6b7169203331-01"
            r = await http.post(url, json={"t": 3}, headers={"traceparent": header})
            assert r.status_code == 200
        assert set(traced.trace(trace_id)) == {"http.telemetry", *PATH}
        assert len(traced.exporter.get_finished_spans()) == 4


async def test_gateway_telemetry_is_traced_per_device(traced: Traced) -> None:
    gateway = await traced.device("traced-gateway", gateway=True)
    client = aiomqtt.Client("127.0.0.1", traced.mqtt_port, username=gateway["access_token"])
    async with client:
        body = {"child-a": [{"t": 1}], "child-b": [{"t": 2}]}
        await client.publish("v1/gateway/telemetry", json.dumps(body), qos=1)
    roots = traced.spans("mqtt.publish")
    assert len(roots) == 2
    for root in roots:
        assert root.context is not None
        spans = traced.trace(root.context.trace_id)
        assert set(spans) == {"mqtt.publish", *PATH}
        _parent_chain(spans, ["mqtt.publish", *PATH])


async def _publish_v5(port: int, token: str, traceparent: str) -> None:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    properties = Properties(PacketTypes.PUBLISH)
    properties.UserProperty = [("traceparent", traceparent)]
    client = aiomqtt.Client("127.0.0.1", port, username=token, protocol=aiomqtt.ProtocolVersion.V5)
    async with client:
        await client.publish(
            "v1/devices/me/telemetry", json.dumps({"t": 1}), qos=1, properties=properties
        )


async def test_an_mqtt5_traceparent_user_property_continues_the_devices_trace(
    tmp_path: Path,
) -> None:
    async with platform_tracing(tmp_path, 0.0) as traced:  # the device's flag decides
        dev = await traced.device("traced-v5")
        trace_id = 0x2AF7651916CD43DD8448EB211C80319C
        await _publish_v5(traced.mqtt_port, dev["access_token"], f"00-{trace_id:032x}-{7:016x}-01")
        spans = traced.trace(trace_id)
        assert set(spans) == {"mqtt.publish", *PATH}
        assert spans["mqtt.publish"].parent is not None
        assert spans["mqtt.publish"].parent.span_id == 7
        _parent_chain(spans, ["mqtt.publish", *PATH])

        not_sampled = f"00-{trace_id + 1:032x}-{7:016x}-00"
        await _publish_v5(traced.mqtt_port, dev["access_token"], not_sampled)
        assert len(traced.exporter.get_finished_spans()) == 4  # nothing more
