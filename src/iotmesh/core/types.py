"""Domain types shared by every layer.

They are msgspec Structs: cheap to build, and they encode to JSON (API) and MessagePack
(bus) without a translation layer.
"""

from __future__ import annotations

import enum
from typing import Any, TypeAlias

import msgspec

# A telemetry value as a device sent it: JSON number (int = long, float = double), bool,
# string, or a JSON object/array (stored as the JSON kind).
Value: TypeAlias = Any


class Aggregation(enum.StrEnum):
    """How points are combined per interval in a query."""

    NONE = "NONE"
    AVG = "AVG"
    MIN = "MIN"
    MAX = "MAX"
    SUM = "SUM"
    COUNT = "COUNT"


class Order(enum.StrEnum):
    """Order of points in a query result (by timestamp)."""

    ASC = "ASC"
    DESC = "DESC"


class TsRecord(msgspec.Struct, array_like=True, gc=False):
    """Values of several keys taken at one timestamp (Unix ms) — one ThingsBoard entry."""

    ts: int
    values: dict[str, Value]


class TelemetryMessage(msgspec.Struct, gc=False, omit_defaults=True):
    """One device message on the bus: the decoded records of one upload.

    `msg_id` is unique per message so that an at-least-once bus can be made idempotent.
    `trace` is the W3C `traceparent` of the message's `bus.publish` span when the
    message is traced (see core/tracing.py); None (and absent from the encoding, so it
    costs no bytes) otherwise.
    """

    msg_id: str
    device_id: str
    received_ts: int
    records: list[TsRecord]
    trace: str | None = None


class TsPoint(msgspec.Struct, gc=False):
    """One point of a query answer, as the REST API shows it."""

    ts: int
    value: Value


class Device(msgspec.Struct):
    """A registered device with its access token.

    `gateway` marks a ThingsBoard-style gateway, which may speak for other devices;
    `gateway_id` names the gateway a device was created by (None for direct devices).
    """

    id: str
    name: str
    type: str
    label: str | None
    created_ts: int
    access_token: str
    gateway: bool = False
    gateway_id: str | None = None
    cert_fingerprint: str | None = None  # SHA-256 of an X.509 client certificate (hex)


class BasicCredentials(msgspec.Struct):
    """A device's MQTT Basic credentials (ThingsBoard's "MQTT Basic").

    At least one of `client_id` and `username` is set; the pair is unique across
    devices. `password_hash` is a self-describing hash (see `registry/passwords.py`),
    never the password; None means any password (or none) is accepted, and needs a
    `username`.
    """

    client_id: str | None
    username: str | None
    password_hash: str | None = None


class AttributeScope(enum.StrEnum):
    """Who writes an attribute: the device (CLIENT), users for the device (SHARED, pushed
    to it), or users for themselves (SERVER, never shown to the device)."""

    CLIENT = "CLIENT"
    SHARED = "SHARED"
    SERVER = "SERVER"


class Attribute(msgspec.Struct, array_like=False):
    """One attribute value; `version` grows by one with every change of the key."""

    key: str
    value: Value
    last_update_ts: int
    version: int


class DevicePage(msgspec.Struct):
    """One page of a device listing."""

    data: list[Device]
    total: int
    page: int
    page_size: int
    has_next: bool


class RpcStatus(enum.StrEnum):
    """Where a server-side RPC request is in its life (docs/device-api.md has the table).

    QUEUED → SENT → DELIVERED → SUCCESSFUL; or TIMEOUT (no reply in time), EXPIRED
    (not delivered before its expiration time), FAILED (a session error, a shutdown).
    """

    QUEUED = "QUEUED"
    SENT = "SENT"
    DELIVERED = "DELIVERED"
    SUCCESSFUL = "SUCCESSFUL"
    TIMEOUT = "TIMEOUT"
    EXPIRED = "EXPIRED"
    FAILED = "FAILED"

    @property
    def open(self) -> bool:
        """Whether the request can still change (it is not finished)."""
        return self in (RpcStatus.QUEUED, RpcStatus.SENT, RpcStatus.DELIVERED)


class RpcRecord(msgspec.Struct, frozen=True):
    """One server-side RPC request as the state store keeps it (times in Unix ms).

    `id` is unique per device for good (ThingsBoard devices see it in
    `.../rpc/request/{id}`). `timeout_ms` bounds the wait for the reply after SENT;
    `expiration_ts` bounds the wait for delivery. `response` is the device's reply,
    `error` says why a request FAILED.
    """

    device_id: str
    id: int
    method: str
    params: Value
    oneway: bool
    persistent: bool
    status: RpcStatus
    timeout_ms: int
    created_ts: int
    expiration_ts: int
    sent_ts: int | None = None
    delivered_ts: int | None = None
    finished_ts: int | None = None
    response: Value = None
    error: str | None = None


class RpcPage(msgspec.Struct):
    """One page of a device's RPC requests, newest first."""

    data: list[RpcRecord]
    total: int
    page: int
    page_size: int
    has_next: bool


class DeviceActivity(msgspec.Struct, frozen=True):
    """What connectivity remembers of a device across a restart (Unix ms; 0: never)."""

    device_id: str
    transport: str | None
    last_activity_ts: int
    last_connect_ts: int
    last_disconnect_ts: int
