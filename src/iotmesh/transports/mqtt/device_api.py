"""The ThingsBoard device API over MQTT (`v1/devices/me/...`), and the hooks gateways use.

Topics a device publishes to:
    v1/devices/me/telemetry                  telemetry (every ThingsBoard JSON form)
    v1/devices/me/attributes                 client attributes
    v1/devices/me/attributes/request/{id}    {"clientKeys": "a,b", "sharedKeys": "c"}
    v1/devices/me/rpc/response/{id}          reply to a server-side RPC request
    v1/devices/me/rpc/request/{id}           client-side RPC {"method", "params"}
Topics it subscribes to:
    v1/devices/me/attributes                 shared attribute changes, pushed
    v1/devices/me/attributes/response/+      answers to attribute requests
    v1/devices/me/rpc/request/+              server-side RPC requests
    v1/devices/me/rpc/response/+             answers to client-side RPC

Durability: telemetry and attribute PUBLISHes are acknowledged after their commit.
All telemetry a connection sent in one socket read goes to the pipeline as one message
(`flush_telemetry`), so a burst costs one bus message and one share of a commit.

Connectivity: a device is online (transport "mqtt") from its accepted CONNECT until its
connection ends, whatever the cause; each PUBLISH is activity (telemetry counts once
per socket read). Devices behind a gateway are online ("gateway") from the first
message the gateway sends for them until `v1/gateway/disconnect` or the end of the
gateway's connection (`gateway.py`).

Tracing (core/tracing.py), when on: the telemetry of one device in one read is an
`mqtt.publish` span, the root of its trace, sampled by `tracing.sample_ratio`; or, when
an MQTT 5 PUBLISH of that read carries a `traceparent` user property (W3C trace
context), a child of it, traced if its sampled flag says so (the first such PUBLISH
of the read counts).

Errors: a payload that is not valid gets PUBACK/PUBREC 0x99 (payload format invalid)
in v5; v3.1.1 has no negative acknowledgement, so the connection is closed, as
ThingsBoard does. Either way nothing of that message is stored.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import msgspec

from iotmesh.commands.client_rpc import answer_client_rpc
from iotmesh.commands.rpc import RpcRequest, RpcService
from iotmesh.core.clock import now_ms
from iotmesh.core.errors import AuthError, DeviceGone, IotmeshError, PayloadError
from iotmesh.core.tracing import (
    AttributeValue,
    SpanKind,
    Tracing,
    context_of,
    end,
    parent_from,
)
from iotmesh.core.types import AttributeScope, Device, TsRecord
from iotmesh.devicestate import AttributeService, ConnectivityService
from iotmesh.devicestate.attributes import requested_values
from iotmesh.pipeline.ingest import TelemetryIngest
from iotmesh.proto.mqtt import Publish, ReasonCode, topic_matches
from iotmesh.proto.thingsboard import (
    attributes_from_json,
    decode_json,
    parse_telemetry,
    shared_update,
    split_keys,
)
from iotmesh.registry.service import DeviceRegistry
from iotmesh.transports.mqtt.auth import DEVICE_PREFIX, GATEWAY_PREFIX

if TYPE_CHECKING:
    from opentelemetry.context import Context

    from iotmesh.transports.mqtt.connection import AckSlot, MqttConnection
    from iotmesh.transports.mqtt.gateway import GatewayApi

log = logging.getLogger(__name__)

TELEMETRY = "v1/devices/me/telemetry"
ATTRIBUTES = "v1/devices/me/attributes"
ATTRIBUTES_REQUEST = "v1/devices/me/attributes/request/"
ATTRIBUTES_RESPONSE = "v1/devices/me/attributes/response/"
RPC_REQUEST = "v1/devices/me/rpc/request/"
RPC_RESPONSE = "v1/devices/me/rpc/response/"
MQTT = "mqtt"  # the transport name connectivity shows

_json = msgspec.json.Encoder()

Done = Callable[[BaseException | None], None]  # told once when a submit is durable or failed


def json_payload(value: Any) -> bytes:
    """Encode a JSON payload for a device."""
    return _json.encode(value)


class DeviceApi:
    """Handles device-API publishes and subscriptions of MQTT connections."""

    def __init__(
        self,
        registry: DeviceRegistry,
        ingest: TelemetryIngest,
        attributes: AttributeService,
        rpc: RpcService,
        session_limits: dict[str, Any] | None = None,
        connectivity: ConnectivityService | None = None,
    ) -> None:
        self.session_limits = session_limits
        self.connectivity = connectivity if connectivity is not None else ConnectivityService()
        self.registry = registry
        self.ingest = ingest
        self.attributes = attributes
        self.rpc = rpc
        self.gateway: GatewayApi | None = None
        self._tracing = ingest.tracing
        # traceparent of the first MQTT 5 telemetry PUBLISH of the current read that had
        # one, by connection; taken by `flush_telemetry` (only filled when tracing).
        self._incoming_traces: dict[MqttConnection, str] = {}

    @staticmethod
    def handles(topic: str) -> bool:
        """Whether a topic (or filter) is part of the device API, not the broker."""
        return topic.startswith(DEVICE_PREFIX) or topic.startswith(GATEWAY_PREFIX)

    # -- publishes from devices -----------------------------------------------------------

    def on_publish(self, conn: MqttConnection, packet: Publish, slot: AckSlot | None) -> None:
        device = conn.principal.device
        assert device is not None  # the ACL lets only devices use these topics
        topic = packet.topic
        try:
            if topic == TELEMETRY:
                records = parse_telemetry(packet.payload, now_ms())
                conn.hold_telemetry((device.id, records, slot))
                if self._tracing is not None and conn.version == 5:
                    self._hold_trace(conn, packet)
                return  # activity: once per read, in flush_telemetry
            self.connectivity.activity(device.id, MQTT)
            if topic == ATTRIBUTES:
                values = attributes_from_json(decode_json(packet.payload))
                self.run(conn, slot, self.attributes.save(device.id, AttributeScope.CLIENT, values))
            elif topic.startswith(ATTRIBUTES_REQUEST):
                request_id = topic[len(ATTRIBUTES_REQUEST) :]
                doc = decode_json(packet.payload) if packet.payload else {}
                self.run(conn, slot, self._answer_attributes(conn, device, request_id, doc))
            elif topic.startswith(RPC_RESPONSE):
                reply_to = _int_id(topic[len(RPC_RESPONSE) :])
                self.rpc.reply(device.id, reply_to, _json_or_text(packet.payload))
                self.run(conn, slot, self.rpc.flushed())  # acked once the reply is stored
            elif topic.startswith(RPC_REQUEST):
                request_id = topic[len(RPC_REQUEST) :]
                doc = decode_json(packet.payload)
                method = doc.get("method") if isinstance(doc, dict) else None
                params = doc.get("params") if isinstance(doc, dict) else None
                answer = answer_client_rpc(method, params, self.session_limits)
                self.send(conn, RPC_RESPONSE + request_id, json_payload(answer))
                conn.complete(slot)
            elif topic.startswith(GATEWAY_PREFIX) and self.gateway is not None:
                self.gateway.on_publish(conn, packet, slot)
            else:
                self.reject(conn, slot, ReasonCode.TOPIC_NAME_INVALID, f"unknown topic {topic}")
        except PayloadError as exc:
            self.reject(conn, slot, ReasonCode.PAYLOAD_FORMAT_INVALID, str(exc))

    def reject(
        self, conn: MqttConnection, slot: AckSlot | None, reason: ReasonCode, message: str
    ) -> None:
        """Refuse one message: a negative ack in v5, closing the connection in v3.1.1."""
        log.info("mqtt %s: message refused (0x%02x): %s", conn.session_id, reason, message)
        if conn.version == 5:
            conn.complete(slot, reason)
        else:
            conn.close()

    def run(self, conn: MqttConnection, slot: AckSlot | None, work: Awaitable[Any]) -> None:
        """Do async work for a message; ack when it is done (refuse if it fails)."""

        async def run() -> None:
            try:
                await work
            except PayloadError as exc:
                self.reject(conn, slot, ReasonCode.PAYLOAD_FORMAT_INVALID, str(exc))
            except AuthError as exc:
                self.reject(conn, slot, ReasonCode.NOT_AUTHORIZED, str(exc))
            except IotmeshError as exc:
                self.reject(conn, slot, ReasonCode.UNSPECIFIED_ERROR, str(exc))
            else:
                conn.complete(slot)

        conn.spawn(run(), "device-api")

    def flush_telemetry(self, conn: MqttConnection) -> None:
        """Hand all telemetry of this read to the pipeline, one message per device."""
        items, conn.pending_telemetry = conn.pending_telemetry, []
        by_device: dict[str, tuple[list[TsRecord], list[AckSlot | None]]] = {}
        for device_id, records, slot in items:
            entry = by_device.setdefault(device_id, ([], []))
            entry[0].extend(records)
            entry[1].append(slot)
        tracing = self._tracing
        incoming = None if tracing is None else self._incoming_traces.pop(conn, None)
        for device_id, (records, slots) in by_device.items():
            self.connectivity.activity(device_id, MQTT)
            conn.submit_started()
            done: Done = partial(self._submitted, conn, slots)
            parent = None
            if tracing is not None and (incoming is not None or tracing.sampled()):
                done, parent = self._traced(tracing, conn, device_id, len(slots), done, incoming)
            if self.ingest.submit_nowait(device_id, records, done, parent):
                continue  # on the bus already: no task needed to wait for it
            conn.spawn(
                self._submit(conn, device_id, records, len(slots), done, parent),
                "telemetry",
                finish_after_close=True,
            )

    def _hold_trace(self, conn: MqttConnection, packet: Publish) -> None:
        if conn in self._incoming_traces or not packet.properties.user_properties:
            return
        for key, value in packet.properties.user_properties:
            if key == "traceparent":
                self._incoming_traces[conn] = value
                return

    @staticmethod
    def _traced(
        tracing: Tracing,
        conn: MqttConnection,
        device_id: str,
        messages: int,
        done: Done,
        incoming: str | None,
    ) -> tuple[Done, Context | None]:
        """An `mqtt.publish` span for one device's telemetry of one read (the root of its
        trace, or a child of the device's `traceparent`), ended when the submit is done;
        none when the device's traceparent says "not sampled"."""
        attributes: dict[str, AttributeValue] = {
            "messaging.system": "mqtt",
            "messaging.destination.name": TELEMETRY,
            "messaging.batch.message_count": messages,
            "messaging.client.id": conn.session_id,
            "iotmesh.device_id": device_id,
        }
        if incoming is None:
            span = tracing.start_root("mqtt.publish", SpanKind.SERVER, attributes)
        else:
            span = tracing.tracer.start_span(
                "mqtt.publish", parent_from(incoming), SpanKind.SERVER, attributes
            )
            if not span.is_recording():
                return done, None

        def traced_done(error: BaseException | None) -> None:
            end(span, error)
            done(error)

        return traced_done, context_of(span)

    def _submitted(
        self, conn: MqttConnection, slots: list[AckSlot | None], error: BaseException | None
    ) -> None:
        """A submit is durable (`error` None) or failed: ack or refuse its messages."""
        conn.submit_finished(len(slots))
        if error is not None:
            for slot in slots:
                self.reject(conn, slot, ReasonCode.UNSPECIFIED_ERROR, str(error))
            return
        conn.ctx.stats.telemetry_batches += 1
        conn.complete_all(slots)

    async def _submit(
        self,
        conn: MqttConnection,
        device_id: str,
        records: list[TsRecord],
        messages: int,
        done: Done,
        parent: Context | None,
    ) -> None:
        """The path when the bus has no room at once: wait for it in a task."""
        try:
            await self.ingest.submit(device_id, records, parent)
        except IotmeshError as exc:
            done(exc)
        except BaseException:
            conn.submit_finished(messages)  # cancelled, or a bug: the task reports it
            raise
        else:
            done(None)

    async def _answer_attributes(
        self, conn: MqttConnection, device: Device, request_id: str, doc: Any
    ) -> None:
        if not isinstance(doc, dict):
            raise PayloadError("attribute request must be a JSON object")
        answer = await requested_values(
            self.attributes,
            device.id,
            split_keys(doc.get("clientKeys")),
            split_keys(doc.get("sharedKeys")),
        )
        self.send(conn, ATTRIBUTES_RESPONSE + request_id, json_payload(answer))

    # -- messages to devices --------------------------------------------------------------

    @staticmethod
    def send(
        conn: MqttConnection,
        topic: str,
        payload: bytes,
        confirm: asyncio.Future[None] | None = None,
    ) -> bool:
        """Publish to the client if it subscribed to `topic`; False when it did not.

        `confirm`: resolved when the client has it (`Session.deliver`)."""
        session = conn.session
        if session is None:
            return False
        qos = -1
        for topic_filter, entry in session.subscriptions.items():
            if topic_matches(topic_filter, topic):
                qos = max(qos, entry.options.qos)
        if qos < 0:
            return False
        session.deliver(Publish(topic, payload, qos), confirm)
        conn.flush_later()
        return True

    def on_subscribe(self, conn: MqttConnection, topic_filter: str) -> None:
        """A device subscribed to a device-API topic: start pushing to it."""
        device = conn.principal.device
        if device is None or conn.session is None:
            return
        if subscribed(conn, ATTRIBUTES) and "attributes" not in conn.pushes:

            async def push(changed: dict[str, Any], deleted: list[str]) -> None:
                self.send(conn, ATTRIBUTES, json_payload(shared_update(changed, deleted)))

            conn.pushes["attributes"] = self.attributes.listen_shared(device.id, push)
        if subscribed(conn, RPC_REQUEST + "1") and "rpc" not in conn.pushes:

            async def deliver(target: Device, request: RpcRequest) -> None:
                body = {"method": request.method, "params": request.params}
                topic = f"{RPC_REQUEST}{request.id}"
                confirm = asyncio.get_running_loop().create_future()
                if not self.send(conn, topic, json_payload(body), confirm):
                    raise DeviceGone("the device is not subscribed to RPC requests")
                await confirm  # written (QoS 0), PUBACK (QoS 1) or PUBREC (QoS 2)

            conn.pushes["rpc"] = self.rpc.attach(device.id, deliver)
        if self.gateway is not None and topic_filter.startswith(GATEWAY_PREFIX):
            self.gateway.on_subscribe(conn, topic_filter)

    def on_unsubscribe(self, conn: MqttConnection) -> None:
        """Stop the pushes no remaining subscription of the client asks for."""
        wanted = {
            "attributes": ATTRIBUTES,
            "rpc": RPC_REQUEST + "1",
            "gateway-rpc": "v1/gateway/rpc",
        }
        for kind, topic in wanted.items():
            if kind in conn.pushes and not subscribed(conn, topic):
                conn.pushes.pop(kind)()
        if not subscribed(conn, "v1/gateway/attributes"):
            for kind in [k for k in conn.pushes if k.startswith("shared:")]:
                conn.pushes.pop(kind)()

    def on_connect(self, conn: MqttConnection) -> None:
        """A client finished CONNECT: a device's session is open until it ends."""
        device = conn.principal.device
        if device is not None and "online" not in conn.pushes:
            self.connectivity.opened(device.id, MQTT)
            conn.pushes["online"] = partial(self.connectivity.closed, device.id, MQTT)

    def on_disconnect(self, conn: MqttConnection) -> None:
        """A client's connection ended: stop every push to it."""
        self._incoming_traces.pop(conn, None)
        pushes, conn.pushes = conn.pushes, {}
        for undo in pushes.values():
            undo()


def subscribed(conn: MqttConnection, topic: str) -> bool:
    """Whether any subscription of the client's session matches `topic`."""
    session = conn.session
    return session is not None and any(topic_matches(f, topic) for f in session.subscriptions)


def _int_id(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise PayloadError(f"request id {text!r} is not a number") from None


def _json_or_text(payload: bytes) -> Any:
    try:
        return decode_json(payload)
    except PayloadError:
        return payload.decode("utf-8", "replace")
