"""docs/asyncapi.json is what the code generates, and the document holds together.

(It was also checked once against the official AsyncAPI 3.0.0 JSON Schema from
@asyncapi/specs; that schema is 380 kB, so it is not vendored here.)
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from iotmesh import asyncapi
from iotmesh.transports.mqtt import device_api, gateway

DOC = Path(__file__).resolve().parents[2] / "docs" / "asyncapi.json"


def test_the_checked_in_document_is_current() -> None:
    assert DOC.read_text(encoding="utf-8") == asyncapi.render(), (
        "docs/asyncapi.json is out of date: run `iotmesh asyncapi -o docs/asyncapi.json`"
    )


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def _resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        assert part in node, f"{ref} does not resolve"
        node = node[part]
    return node


def test_every_reference_resolves() -> None:
    doc = asyncapi.build()
    refs = _refs(doc)
    assert len(refs) > 50
    for ref in refs:
        _resolve(doc, ref)


def test_channels_and_operations_agree() -> None:
    doc = asyncapi.build()
    for name, channel in doc["channels"].items():
        placeholders = set(re.findall(r"\{(\w+)\}", channel["address"]))
        assert placeholders == set(channel.get("parameters", {})), name
    for name, operation in doc["operations"].items():
        assert operation["action"] in ("send", "receive"), name
        channel_ref = operation["channel"]["$ref"]
        for message in operation.get("messages", []):
            assert message["$ref"].startswith(channel_ref + "/messages/"), name


def test_every_device_topic_of_the_handlers_is_documented() -> None:
    addresses = [c["address"] for c in asyncapi.build()["channels"].values()]
    for module in (device_api, gateway):
        topics = [
            value
            for name, value in vars(module).items()
            if isinstance(value, str) and value.startswith("v1/") and not name.endswith("_PREFIX")
        ]
        assert topics
        for topic in topics:
            assert any(a == topic or a.startswith(topic + "{") for a in addresses), topic


def test_the_bus_payload_is_the_telemetry_message_type() -> None:
    doc = asyncapi.build()
    schema = doc["components"]["schemas"]["TelemetryMessage"]
    assert set(schema["properties"]) == {"msg_id", "device_id", "received_ts", "records", "trace"}
    record = doc["components"]["schemas"]["TsRecord"]
    assert "prefixItems" not in json.dumps(record)  # draft 7, as AsyncAPI schemas are
    assert doc["channels"]["busTelemetry"]["address"] == "telemetry.{deviceId}"


def test_the_cli_writes_the_document(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from iotmesh.cli.main import app

    out = tmp_path / "asyncapi.json"
    result = CliRunner().invoke(app, ["asyncapi", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_text(encoding="utf-8") == asyncapi.render()
    printed = CliRunner().invoke(app, ["asyncapi"])
    assert json.loads(printed.stdout)["asyncapi"] == "3.0.0"
