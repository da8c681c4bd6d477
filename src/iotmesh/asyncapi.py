"""The AsyncAPI 3.0 document of iotmesh: the device MQTT topics and the internal bus.

Built from the code, not written by hand: topic names come from the constants the MQTT
handlers use (`transports/mqtt/device_api.py`, `gateway.py`), bus subjects from
`bus/subjects.py` and the bus settings, the bus payload schema from the msgspec type
it is encoded from (`TelemetryMessage`), default ports from the settings. `iotmesh
asyncapi -o docs/asyncapi.json` writes it; a test fails when the checked-in file and
the code disagree. The device payloads (ThingsBoard's JSON forms) are parsed by hand in
`proto/thingsboard.py`, so their schemas are kept here, next to the topics.

The document describes iotmesh as the application: `receive` operations are what
devices (or transports) send to it, `send` operations what it sends.
"""

from __future__ import annotations

import inspect
from typing import Any
from urllib.parse import urlsplit

import msgspec

from iotmesh import __version__
from iotmesh.bus import subjects
from iotmesh.core.settings import BusSettings, MqttSettings
from iotmesh.core.types import TelemetryMessage
from iotmesh.devicestate.attributes import SharedChange
from iotmesh.pipeline.service import GROUP
from iotmesh.transports.mqtt import device_api as dev
from iotmesh.transports.mqtt import gateway as gw

Schema = dict[str, Any]

_VALUE: Schema = {
    "description": "A value: number (integer = long, else double), boolean, string, or a"
    " JSON object/array (stored as JSON).",
    "type": ["number", "boolean", "string", "object", "array"],
}
_VALUES: Schema = {"type": "object", "additionalProperties": _VALUE}
_ENTRY: Schema = {
    "oneOf": [
        {**_VALUES, "description": "Values taken now (the server's clock)."},
        {
            "type": "object",
            "properties": {"ts": {"type": "integer", "description": "Unix ms"}, "values": _VALUES},
            "required": ["ts", "values"],
        },
    ]
}
_TELEMETRY: Schema = {
    "description": "Any ThingsBoard telemetry form: values, {ts, values}, or an array of them.",
    "oneOf": [_ENTRY, {"type": "array", "items": _ENTRY}],
}
_ANY: Schema = {"description": "Any JSON value."}
_DEVICE: Schema = {"type": "string", "description": "Name of the device behind the gateway."}
_RPC_CALL: Schema = {
    "type": "object",
    "properties": {"method": {"type": "string"}, "params": _ANY},
    "required": ["method"],
}

# name → (title, JSON Schema of the payload); JSON unless the name starts with "bus".
_MESSAGES: dict[str, tuple[str, Schema]] = {
    "telemetry": ("Telemetry from a device", _TELEMETRY),
    "clientAttributes": ("Client attributes a device reports", _VALUES),
    "sharedAttributesUpdate": (
        "Shared attributes that changed (or the keys deleted)",
        {
            "oneOf": [
                _VALUES,
                {
                    "type": "object",
                    "properties": {"deleted": {"type": "array", "items": {"type": "string"}}},
                    "required": ["deleted"],
                },
            ]
        },
    ),
    "attributesRequest": (
        "A device asks for attribute values (comma-separated keys; none: all)",
        {
            "type": "object",
            "properties": {"clientKeys": {"type": "string"}, "sharedKeys": {"type": "string"}},
        },
    ),
    "attributesResponse": (
        "The attribute values asked for",
        {"type": "object", "properties": {"client": _VALUES, "shared": _VALUES}},
    ),
    "serverRpcRequest": ("A server-side RPC request to the device", _RPC_CALL),
    "serverRpcResponse": ("The device's reply to a server-side RPC request", _ANY),
    "clientRpcRequest": ("An RPC request from the device to the server", _RPC_CALL),
    "clientRpcResponse": ("The server's answer to a client-side RPC request", _ANY),
    "gatewayConnect": (
        "A device behind the gateway is connected (created on first sight)",
        {
            "type": "object",
            "properties": {"device": _DEVICE, "type": {"type": "string"}},
            "required": ["device"],
        },
    ),
    "gatewayDisconnect": (
        "A device behind the gateway went away",
        {"type": "object", "properties": {"device": _DEVICE}, "required": ["device"]},
    ),
    "gatewayTelemetry": (
        "Telemetry of devices behind the gateway, by device name",
        {"type": "object", "additionalProperties": _TELEMETRY},
    ),
    "gatewayAttributes": (
        "Client attributes of devices behind the gateway, by device name",
        {"type": "object", "additionalProperties": _VALUES},
    ),
    "gatewaySharedAttributes": (
        "Shared attributes of a device behind the gateway changed",
        {
            "type": "object",
            "properties": {"device": _DEVICE, "data": _VALUES},
            "required": ["device", "data"],
        },
    ),
    "gatewayAttributesRequest": (
        "The gateway asks for attributes of one of its devices",
        {
            "type": "object",
            "properties": {
                "id": {"type": "integer"},
                "device": _DEVICE,
                "client": {"type": "boolean", "description": "client scope, else shared"},
                "key": {"type": "string"},
                "keys": {"type": "array", "items": {"type": "string"}},
            },
            "required": ["id", "device"],
        },
    ),
    "gatewayAttributesResponse": (
        "The attributes asked for (value for key, values for keys)",
        {
            "type": "object",
            "properties": {
                "id": {"type": "integer"},
                "device": _DEVICE,
                "value": _VALUE,
                "values": _VALUES,
            },
            "required": ["id", "device"],
        },
    ),
    "gatewayRpcRequest": (
        "A server-side RPC request to a device behind the gateway",
        {
            "type": "object",
            "properties": {
                "device": _DEVICE,
                "data": {
                    "type": "object",
                    "properties": {"id": {"type": "integer"}, **_RPC_CALL["properties"]},
                    "required": ["id", "method"],
                },
            },
            "required": ["device", "data"],
        },
    ),
    "gatewayRpcResponse": (
        "The reply of a device behind the gateway to an RPC request",
        {
            "type": "object",
            "properties": {"device": _DEVICE, "id": {"type": "integer"}, "data": _ANY},
            "required": ["device", "id"],
        },
    ),
}

_REQUEST_ID = {"description": "Request id, chosen by whoever sends the request."}

# channel id → (topic, parameters, messages, what iotmesh receives, what it sends)
_MQTT: list[tuple[str, str, dict[str, Any], list[str], list[str]]] = [
    ("deviceTelemetry", dev.TELEMETRY, {}, ["telemetry"], []),
    (
        "deviceAttributes",
        dev.ATTRIBUTES,
        {},
        ["clientAttributes"],
        ["sharedAttributesUpdate"],
    ),
    (
        "deviceAttributesRequest",
        dev.ATTRIBUTES_REQUEST + "{requestId}",
        {"requestId": _REQUEST_ID},
        ["attributesRequest"],
        [],
    ),
    (
        "deviceAttributesResponse",
        dev.ATTRIBUTES_RESPONSE + "{requestId}",
        {"requestId": _REQUEST_ID},
        [],
        ["attributesResponse"],
    ),
    (
        "deviceRpcRequest",
        dev.RPC_REQUEST + "{requestId}",
        {"requestId": _REQUEST_ID},
        ["clientRpcRequest"],
        ["serverRpcRequest"],
    ),
    (
        "deviceRpcResponse",
        dev.RPC_RESPONSE + "{requestId}",
        {"requestId": _REQUEST_ID},
        ["serverRpcResponse"],
        ["clientRpcResponse"],
    ),
    ("gatewayConnect", gw.CONNECT, {}, ["gatewayConnect"], []),
    ("gatewayDisconnect", gw.DISCONNECT, {}, ["gatewayDisconnect"], []),
    ("gatewayTelemetry", gw.TELEMETRY, {}, ["gatewayTelemetry"], []),
    (
        "gatewayAttributes",
        gw.ATTRIBUTES,
        {},
        ["gatewayAttributes"],
        ["gatewaySharedAttributes"],
    ),
    ("gatewayAttributesRequest", gw.ATTRIBUTES_REQUEST, {}, ["gatewayAttributesRequest"], []),
    ("gatewayAttributesResponse", gw.ATTRIBUTES_RESPONSE, {}, [], ["gatewayAttributesResponse"]),
    ("gatewayRpc", gw.RPC, {}, ["gatewayRpcResponse"], ["gatewayRpcRequest"]),
]


def _draft7(schema: Any) -> Any:
    """msgspec writes JSON Schema 2020-12; AsyncAPI schemas are draft 7: a tuple is
    `items: [...]`, not `prefixItems`. Docstring indentation is dropped too."""
    if isinstance(schema, dict):
        out = {
            k: inspect.cleandoc(v) if k == "description" and isinstance(v, str) else _draft7(v)
            for k, v in schema.items()
            if k != "prefixItems"
        }
        if "prefixItems" in schema:
            out["items"] = _draft7(schema["prefixItems"])
            out["additionalItems"] = False
        return out
    if isinstance(schema, list):
        return [_draft7(item) for item in schema]
    return schema


def _host(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port}"


def _ref(*path: str) -> dict[str, str]:
    return {"$ref": "#/" + "/".join(path)}


# Live broadcasts (bus/broadcast.py): channel name → (topic, message, Redis channel
# after the namespace, what it says). RPC on Redis goes through the hot state's
# notifier (storage/redis/wakeups.py), whose channels are named its own way.
_LIVE = {
    "liveSharedAttributes": (
        subjects.SHARED_ATTRIBUTES,
        "liveSharedChange",
        f"{subjects.LIVE}:{subjects.SHARED_ATTRIBUTES}",
        "A shared-attribute change committed by one process, for the sessions of the"
        " device in the others (the origin skips its own).",
    ),
    "liveRpcWake": (
        subjects.RPC_WAKE,
        "liveRpcWake",
        "rpc:wake",
        "A device has QUEUED RPC requests in the state store: the process holding its"
        " session loads and claims them. With storage.redis.rpc_wakeups it is on the hot"
        " state's Redis and namespace instead.",
    ),
    "liveRpcDone": (
        subjects.RPC_DONE,
        "liveRpcDone",
        "rpc:done",
        "An RPC request ended and the end is committed: a caller waiting for it in"
        " another process reads the outcome from the store. With storage.redis.rpc_wakeups"
        " it is on the hot state's Redis and namespace instead.",
    ),
}


def _live_messages() -> dict[str, Any]:
    return {
        "liveSharedChange": {
            "name": "liveSharedChange",
            "title": "A committed change of a device's shared attributes",
            "contentType": "application/json",
            "payload": _ref("components", "schemas", "SharedChange"),
        },
        "liveRpcWake": {
            "name": "liveRpcWake",
            "title": "The id of a device with queued RPC requests",
            "contentType": "text/plain",
            "payload": {"type": "string"},
        },
        "liveRpcDone": {
            "name": "liveRpcDone",
            "title": "`<device id>/<request id>` of a finished RPC request",
            "contentType": "text/plain",
            "payload": {"type": "string"},
        },
    }


def _add_live(
    channels: dict[str, Any],
    operations: dict[str, Any],
    bus: BusSettings,
    servers: list[dict[str, str]],
) -> None:
    """The live broadcasts between `iotmesh serve` processes: at most once, not stored."""
    for channel, (topic, message, redis_channel, summary) in _LIVE.items():
        channels[channel] = {
            "address": f"{subjects.LIVE}.{topic}",
            "description": f"{summary} Live and at most once (nothing stored; the state"
            f" store is the truth). NATS: core subject `{bus.namespace}.{subjects.LIVE}.{topic}`;"
            f" Redis: pub/sub channel `{bus.namespace}:{redis_channel}`.",
            "messages": {message: _ref("components", "messages", message)},
            "servers": servers,
        }
        suffix = channel.removeprefix("live")
        for action in ("send", "receive"):
            operations[f"{action}Live{suffix}"] = {
                "action": action,
                "channel": _ref("channels", channel),
            }


def build() -> dict[str, Any]:
    """The AsyncAPI document as a JSON-ready dict (keys in a stable order)."""
    mqtt = MqttSettings()
    bus = BusSettings()
    (_, _), bus_schemas = msgspec.json.schema_components(
        [TelemetryMessage, SharedChange], ref_template="#/components/schemas/{name}"
    )
    messages: dict[str, Any] = {
        name: {
            "name": name,
            "title": title,
            "contentType": "application/json",
            "payload": payload,
        }
        for name, (title, payload) in _MESSAGES.items()
    }
    messages["busTelemetry"] = {
        "name": "busTelemetry",
        "title": "One upload of one device, parsed and authenticated",
        "summary": "MessagePack of TelemetryMessage; key = device id, id = msg_id.",
        "contentType": "application/msgpack",
        "payload": _ref("components", "schemas", "TelemetryMessage"),
    }
    messages.update(_live_messages())
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    mqtt_servers = [_ref("servers", "mqtt"), _ref("servers", "mqtts")]
    for channel, topic, parameters, received, sent in _MQTT:
        entry: dict[str, Any] = {
            "address": topic,
            "messages": {m: _ref("components", "messages", m) for m in received + sent},
            "servers": mqtt_servers,
        }
        if parameters:
            entry["parameters"] = parameters
        channels[channel] = entry
        for action, names in (("receive", received), ("send", sent)):
            if names:
                operations[f"{action}{channel[0].upper()}{channel[1:]}"] = {
                    "action": action,
                    "channel": _ref("channels", channel),
                    "messages": [_ref("channels", channel, "messages", m) for m in names],
                }
    bus_servers = [_ref("servers", "nats"), _ref("servers", "redis")]
    device_param = {"deviceId": {"description": "Device id; also the partition key."}}
    channels["busTelemetry"] = {
        "address": subjects.telemetry_subject("{deviceId}"),
        "description": "Every accepted upload, on its way to the pipeline. The partition is"
        f" crc32(device id) % bus.partitions ({bus.partitions} by default); NATS carries it"
        f" as `{bus.namespace}.{subjects.TELEMETRY}.p<n>.<device id>`, Redis in the stream"
        f" `{bus.namespace}:{subjects.TELEMETRY}:p<n>`.",
        "parameters": device_param,
        "messages": {"busTelemetry": _ref("components", "messages", "busTelemetry")},
        "servers": bus_servers,
    }
    channels["busDeadLetter"] = {
        "address": f"{bus.dead_letter_subject}.{GROUP}." + subjects.telemetry_subject("{deviceId}"),
        "description": "Telemetry the pipeline gave up (the reason in a header or field),"
        " kept for bus.dead_letter_max_age_s.",
        "parameters": device_param,
        "messages": {"busTelemetry": _ref("components", "messages", "busTelemetry")},
        "servers": bus_servers,
    }
    operations["publishBusTelemetry"] = {
        "action": "send",
        "channel": _ref("channels", "busTelemetry"),
        "summary": "Transports publish each accepted upload (TelemetryIngest).",
    }
    operations["consumeBusTelemetry"] = {
        "action": "receive",
        "channel": _ref("channels", "busTelemetry"),
        "summary": f"The pipeline (consumer group `{GROUP}`) stores it, then acks.",
    }
    operations["deadLetterBusTelemetry"] = {
        "action": "send",
        "channel": _ref("channels", "busDeadLetter"),
    }
    _add_live(channels, operations, bus, bus_servers)
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "iotmesh",
            "version": __version__,
            "description": "Device MQTT topics (the ThingsBoard device and gateway API) and"
            " the internal bus between transports and the pipeline. Generated by"
            " `iotmesh asyncapi`; do not edit by hand.",
        },
        "defaultContentType": "application/json",
        "servers": {
            "mqtt": {
                "host": f"localhost:{mqtt.port}",
                "protocol": "mqtt",
                "description": "Devices; mqtt.port. MQTT 3.1.1 and 5.0.",
                "security": [_ref("components", "securitySchemes", "accessToken")],
            },
            "mqtts": {
                "host": "localhost:8883",
                "protocol": "secure-mqtt",
                "description": "Devices over TLS; mqtt.tls_port (unset by default).",
                "security": [
                    _ref("components", "securitySchemes", "accessToken"),
                    _ref("components", "securitySchemes", "clientCertificate"),
                ],
            },
            "nats": {
                "host": _host(bus.nats_url),
                "protocol": "nats",
                "description": "The bus with bus.backend = nats (JetStream).",
            },
            "redis": {
                "host": _host(bus.redis_url),
                "protocol": "redis",
                "description": "The bus with bus.backend = redis (Redis Streams).",
            },
        },
        "channels": channels,
        "operations": operations,
        "components": {
            "schemas": _draft7(bus_schemas),
            "messages": messages,
            "securitySchemes": {
                "accessToken": {
                    "type": "userPassword",
                    "description": "User name = the device's access token (no password), or"
                    " MQTT Basic credentials (client id / user name / password).",
                },
                "clientCertificate": {
                    "type": "X509",
                    "description": "A client certificate registered for the device.",
                },
            },
        },
    }


def render() -> str:
    """The document as the text checked in at docs/asyncapi.json."""
    return msgspec.json.format(msgspec.json.encode(build()), indent=2).decode() + "\n"
