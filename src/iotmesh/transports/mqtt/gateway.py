"""The ThingsBoard gateway API over MQTT (`v1/gateway/...`), for gateway devices.

A gateway speaks for devices behind it, by name. A device named for the first time is
created and belongs to the gateway (`gateway_id`).

    v1/gateway/connect             {"device": "A", "type": "thermostat"}
    v1/gateway/disconnect          {"device": "A"}
    v1/gateway/telemetry           {"A": [{"ts": ..., "values": {...}}, ...], "B": ...}
    v1/gateway/attributes          {"A": {"fw": "1.2"}}            (client attributes)
    v1/gateway/attributes/request  {"id": 1, "device": "A", "client": true, "key": "k"}
                                   (or "keys": [...], [] for all) → v1/gateway/attributes/response
    v1/gateway/rpc                 {"device": "A", "id": 1, "data": {...}}  (RPC reply)
A device behind the gateway is online (transport "gateway") from the first message the
gateway sends for it until `v1/gateway/disconnect` names it or the gateway's connection
ends; its telemetry and attributes count as its activity.

The server publishes to the gateway:
    v1/gateway/attributes          {"device": "A", "data": {...}}   (shared changes)
    v1/gateway/rpc                 {"device": "A", "data": {"id", "method", "params"}}
"""

from __future__ import annotations

import asyncio
from functools import partial
from typing import TYPE_CHECKING, Any

from iotmesh.commands.rpc import RpcRequest
from iotmesh.core.clock import now_ms
from iotmesh.core.errors import AuthError, Conflict, DeviceGone, PayloadError
from iotmesh.core.tracing import SpanKind, context_of, end
from iotmesh.core.types import AttributeScope, Device
from iotmesh.proto.mqtt import Publish, ReasonCode, topic_matches
from iotmesh.proto.thingsboard import (
    attributes_from_json,
    decode_json,
    shared_update,
    telemetry_from_json,
)
from iotmesh.transports.mqtt.device_api import DeviceApi, json_payload, subscribed

if TYPE_CHECKING:
    from iotmesh.transports.mqtt.connection import AckSlot, MqttConnection

CONNECT = "v1/gateway/connect"
DISCONNECT = "v1/gateway/disconnect"
TELEMETRY = "v1/gateway/telemetry"
ATTRIBUTES = "v1/gateway/attributes"
ATTRIBUTES_REQUEST = "v1/gateway/attributes/request"
ATTRIBUTES_RESPONSE = "v1/gateway/attributes/response"
RPC = "v1/gateway/rpc"
GATEWAY = "gateway"  # the transport name connectivity shows for devices behind one


def _device_name(doc: Any) -> str:
    name = doc.get("device") if isinstance(doc, dict) else None
    if not isinstance(name, str) or not name.strip():
        raise PayloadError("'device' must name the device")
    return name.strip()


class GatewayApi:
    """Handles gateway topics for connections of gateway devices."""

    def __init__(self, device_api: DeviceApi) -> None:
        self._api = device_api

    async def child(self, conn: MqttConnection, name: str, type_: str = "default") -> Device:
        """The device `name` behind this gateway, created on first sight."""
        cache: dict[str, Device] = conn.gateway_children
        device = cache.get(name)
        if device is not None:
            return device
        gateway = conn.principal.device
        assert gateway is not None
        registry = self._api.registry
        device = await registry.by_name(name)
        if device is not None and device.gateway_id != gateway.id:
            raise AuthError(f"device {name!r} does not belong to this gateway")
        if device is None:
            try:
                device = await registry.create(name, type=type_, gateway_id=gateway.id)
            except Conflict:  # created meanwhile by another message
                device = await registry.by_name(name)
                assert device is not None
        cache[name] = device
        self._watch_shared(conn, device)
        online = f"online:{device.id}"
        if online not in conn.pushes:
            connectivity = self._api.connectivity
            connectivity.opened(device.id, GATEWAY)
            conn.pushes[online] = partial(connectivity.closed, device.id, GATEWAY)
        return device

    def on_publish(self, conn: MqttConnection, packet: Publish, slot: AckSlot | None) -> None:
        doc = decode_json(packet.payload)
        topic = packet.topic
        api = self._api
        if topic == TELEMETRY:
            api.run(conn, slot, self._telemetry(conn, doc))
        elif topic == ATTRIBUTES:
            api.run(conn, slot, self._attributes(conn, doc))
        elif topic == ATTRIBUTES_REQUEST:
            api.run(conn, slot, self._attribute_request(conn, doc))
        elif topic == CONNECT:
            name = _device_name(doc)
            type_ = doc.get("type") or "default"
            api.run(conn, slot, self.child(conn, name, str(type_)))
        elif topic == DISCONNECT:
            child = conn.gateway_children.pop(_device_name(doc), None)
            if child is not None:
                closed = conn.pushes.pop(f"online:{child.id}", None)
                if closed is not None:
                    closed()
            conn.complete(slot)
        elif topic == RPC:
            api.run(conn, slot, self._rpc_reply(conn, doc))
        else:
            api.reject(conn, slot, ReasonCode.TOPIC_NAME_INVALID, f"unknown gateway topic {topic}")

    async def _telemetry(self, conn: MqttConnection, doc: Any) -> None:
        if not isinstance(doc, dict) or not doc:
            raise PayloadError("gateway telemetry must map device names to entries")
        now = now_ms()
        parsed = [(name, telemetry_from_json(entries, now)) for name, entries in doc.items()]
        tracing = self._api.ingest.tracing
        for name, records in parsed:
            device = await self.child(conn, name)
            self._api.connectivity.activity(device.id, GATEWAY)
            if tracing is None or not tracing.sampled():
                await self._api.ingest.submit(device.id, records)
                continue
            attributes = {
                "messaging.system": "mqtt",
                "messaging.destination.name": TELEMETRY,
                "messaging.client.id": conn.session_id,
                "iotmesh.device_id": device.id,
            }
            span = tracing.start_root("mqtt.publish", SpanKind.SERVER, attributes)
            try:
                await self._api.ingest.submit(device.id, records, context_of(span))
            except BaseException as exc:
                end(span, exc)
                raise
            span.end()

    async def _attributes(self, conn: MqttConnection, doc: Any) -> None:
        if not isinstance(doc, dict) or not doc:
            raise PayloadError("gateway attributes must map device names to objects")
        parsed = [(name, attributes_from_json(values, name)) for name, values in doc.items()]
        for name, values in parsed:
            device = await self.child(conn, name)
            self._api.connectivity.activity(device.id, GATEWAY)
            await self._api.attributes.save(device.id, AttributeScope.CLIENT, values)

    async def _attribute_request(self, conn: MqttConnection, doc: Any) -> None:
        device = await self.child(conn, _device_name(doc))
        request_id = doc.get("id")
        scope = AttributeScope.CLIENT if doc.get("client") else AttributeScope.SHARED
        if "keys" in doc:
            # An empty list asks for every attribute of the scope, as in ThingsBoard:
            # thingsboard-gateway syncs all shared attributes of a device that way.
            keys = [str(k) for k in doc.get("keys") or []] or None
            values = await self._api.attributes.values(device.id, scope, keys)
            answer: dict[str, Any] = {"id": request_id, "device": device.name, "values": values}
        else:
            key = str(doc.get("key", ""))
            values = await self._api.attributes.values(device.id, scope, [key])
            answer = {"id": request_id, "device": device.name, "value": values.get(key)}
        self._api.send(conn, ATTRIBUTES_RESPONSE, json_payload(answer))

    async def _rpc_reply(self, conn: MqttConnection, doc: Any) -> None:
        device = await self.child(conn, _device_name(doc))
        request_id = doc.get("id")
        if not isinstance(request_id, int):
            raise PayloadError("'id' must be the number of the RPC request")
        self._api.rpc.reply(device.id, request_id, doc.get("data"))
        await self._api.rpc.flushed()  # acked once the reply is stored

    def on_subscribe(self, conn: MqttConnection, topic_filter: str) -> None:
        gateway = conn.principal.device
        session = conn.session
        if gateway is None or session is None or not gateway.gateway:
            return
        if "gateway-rpc" not in conn.pushes and subscribed(conn, RPC):

            async def deliver(target: Device, request: RpcRequest) -> None:
                data = {"id": request.id, "method": request.method, "params": request.params}
                body = {"device": target.name, "data": data}
                confirm = asyncio.get_running_loop().create_future()
                if not self._api.send(conn, RPC, json_payload(body), confirm):
                    raise DeviceGone("the gateway is not subscribed to v1/gateway/rpc")
                await confirm  # as for a device: written, PUBACK or PUBREC

            conn.pushes["gateway-rpc"] = self._api.rpc.attach_gateway(gateway.id, deliver)
        if topic_matches(topic_filter, ATTRIBUTES):
            for device in conn.gateway_children.values():
                self._watch_shared(conn, device)

    def _watch_shared(self, conn: MqttConnection, device: Device) -> None:
        key = f"shared:{device.id}"
        if key in conn.pushes or not subscribed(conn, ATTRIBUTES):
            return

        async def push(changed: dict[str, Any], deleted: list[str]) -> None:
            data = shared_update(changed, deleted)
            self._api.send(conn, ATTRIBUTES, json_payload({"device": device.name, "data": data}))

        conn.pushes[key] = self._api.attributes.listen_shared(device.id, push)
