"""A real `iotmesh run` exports its spans with OTLP/HTTP to a collector.

The collector is a small HTTP server here that keeps what is POSTed to /v1/traces;
the bodies are decoded with the OTLP protobuf definitions (opentelemetry-proto).
"""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.integration.mqtt_helpers import device_client
from tests.integration.server import start_server


class Collector(http.server.ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[ExportTraceServiceRequest] = []
        self.content_types: list[str] = []

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1/traces"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: Collector

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        self.server.requests.append(request)
        self.server.content_types.append(self.headers["Content-Type"])
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def collector() -> Iterator[Collector]:
    server = Collector()
    thread = threading.Thread(target=server.serve_forever, name="otlp-collector", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_spans_reach_an_otlp_collector(
    data_dir: Path, tmp_path: Path, collector: Collector
) -> None:
    env = {
        "IOTMESH_TRACING__ENABLED": "true",
        "IOTMESH_TRACING__SAMPLE_RATIO": "1",
        "IOTMESH_TRACING__EXPORTER": "otlp",
        "IOTMESH_TRACING__ENDPOINT": collector.endpoint,
    }
    srv = start_server(data_dir, tmp_path / "logs", env=env)
    try:
        instance = json.loads((data_dir / "run.json").read_text())["instance_id"]
        with srv.admin() as admin:
            dev = admin.post("/api/v1/devices", json={"name": "exported"}).json()
        with device_client(srv.mqtt_port, dev["access_token"]) as client:
            client.publish("v1/devices/me/telemetry", json.dumps({"t": 1}), qos=1)
    finally:
        assert srv.stop() == 0  # a clean stop flushes the batched spans

    assert collector.requests, "nothing was exported"
    assert set(collector.content_types) == {"application/x-protobuf"}
    spans = {}
    for request in collector.requests:
        for resource_spans in request.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            assert resource["service.name"] == "iotmesh"
            assert resource["service.instance.id"] == instance
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    spans[span.name] = span
    assert {"mqtt.publish", "bus.publish", "pipeline.handle", "storage.commit"} <= set(spans)
    assert len({span.trace_id for span in spans.values()}) == 1
    assert spans["bus.publish"].parent_span_id == spans["mqtt.publish"].span_id
    assert spans["storage.commit"].parent_span_id == spans["pipeline.handle"].span_id
