"""The MQTT control packets as plain typed values, one class per packet type.

Rules:
- A packet is version-neutral: the same `Publish` is encoded for v3.1.1 or v5, and the
  codec drops what v3.1.1 cannot carry (properties, most reason codes). Code above the
  codec therefore speaks v5 terms only (`ReasonCode`), whatever the client speaks.
- Packets are cheap to build (slots, no validation in `__init__`): the server makes one
  per message per subscriber. Validity is checked where bytes are made or read - in
  `encode` and the reader - so a packet in memory may be invalid until it is sent.
- `packet_id` is None where the packet has none (QoS 0 PUBLISH) and 1..65535 otherwise.
- `properties` is always a `Properties`, empty by default; equality treats an empty one
  and a missing one alike, so `decode(encode(p)) == p` holds for both versions' shapes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import ClassVar

from .properties import Properties
from .reason_codes import ReasonCode


class PacketType(IntEnum):
    CONNECT = 1
    CONNACK = 2
    PUBLISH = 3
    PUBACK = 4
    PUBREC = 5
    PUBREL = 6
    PUBCOMP = 7
    SUBSCRIBE = 8
    SUBACK = 9
    UNSUBSCRIBE = 10
    UNSUBACK = 11
    PINGREQ = 12
    PINGRESP = 13
    DISCONNECT = 14
    AUTH = 15


@dataclass(slots=True)
class Will:
    """The will message of a CONNECT: published by the server if the client vanishes."""

    topic: str
    payload: bytes = b""
    qos: int = 0
    retain: bool = False
    properties: Properties = field(default_factory=Properties)


@dataclass(slots=True)
class Connect:
    """CONNECT. `protocol_level` is 4 (v3.1.1) or 5 (v5); `clean_start` is v3.1.1's
    Clean Session. `password` is bytes: MQTT calls it binary data."""

    TYPE: ClassVar[int] = 1
    protocol_level: int = 5
    client_id: str = ""
    clean_start: bool = True
    keep_alive: int = 0
    username: str | None = None
    password: bytes | None = None
    will: Will | None = None
    properties: Properties = field(default_factory=Properties)


@dataclass(slots=True)
class Connack:
    """CONNACK. In v3.1.1 `reason_code` is mapped to a return code 0-5 on the wire."""

    TYPE: ClassVar[int] = 2
    session_present: bool = False
    reason_code: ReasonCode = ReasonCode.SUCCESS
    properties: Properties = field(default_factory=Properties)


@dataclass(slots=True)
class Publish:
    """PUBLISH. v5 allows `topic == ""` when `properties.topic_alias` is set."""

    TYPE: ClassVar[int] = 3
    topic: str
    payload: bytes = b""
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: int | None = None
    properties: Properties = field(default_factory=Properties)


@dataclass(slots=True)
class _Ack:
    packet_id: int
    reason_code: ReasonCode = ReasonCode.SUCCESS
    properties: Properties = field(default_factory=Properties)


@dataclass(slots=True)
class Puback(_Ack):
    """PUBACK: QoS 1 delivered."""

    TYPE: ClassVar[int] = 4


@dataclass(slots=True)
class Pubrec(_Ack):
    """PUBREC: QoS 2, step 1."""

    TYPE: ClassVar[int] = 5


@dataclass(slots=True)
class Pubrel(_Ack):
    """PUBREL: QoS 2, step 2."""

    TYPE: ClassVar[int] = 6


@dataclass(slots=True)
class Pubcomp(_Ack):
    """PUBCOMP: QoS 2, step 3."""

    TYPE: ClassVar[int] = 7


@dataclass(slots=True)
class Subscription:
    """One topic filter of a SUBSCRIBE and its options (v3.1.1 carries only `qos`).

    `retain_handling`: 0 send retained messages on subscribe, 1 only if the
    subscription is new, 2 never.
    """

    topic_filter: str
    qos: int = 0
    no_local: bool = False
    retain_as_published: bool = False
    retain_handling: int = 0


@dataclass(slots=True)
class Subscribe:
    TYPE: ClassVar[int] = 8
    packet_id: int
    subscriptions: list[Subscription]
    properties: Properties = field(default_factory=Properties)


@dataclass(slots=True)
class Suback:
    """SUBACK: one reason code per subscription, in order (v3.1.1: 0, 1, 2 or 0x80)."""

    TYPE: ClassVar[int] = 9
    packet_id: int
    reason_codes: list[ReasonCode]
    properties: Properties = field(default_factory=Properties)


@dataclass(slots=True)
class Unsubscribe:
    TYPE: ClassVar[int] = 10
    packet_id: int
    topic_filters: list[str]
    properties: Properties = field(default_factory=Properties)


@dataclass(slots=True)
class Unsuback:
    """UNSUBACK: v5 has one reason code per filter; v3.1.1 has none (decodes as [])."""

    TYPE: ClassVar[int] = 11
    packet_id: int
    reason_codes: list[ReasonCode] = field(default_factory=list)
    properties: Properties = field(default_factory=Properties)


@dataclass(slots=True)
class Pingreq:
    TYPE: ClassVar[int] = 12


@dataclass(slots=True)
class Pingresp:
    TYPE: ClassVar[int] = 13


@dataclass(slots=True)
class Disconnect:
    """DISCONNECT. v3.1.1 has no body: reason and properties are not sent."""

    TYPE: ClassVar[int] = 14
    reason_code: ReasonCode = ReasonCode.NORMAL_DISCONNECTION
    properties: Properties = field(default_factory=Properties)


@dataclass(slots=True)
class Auth:
    """AUTH (v5 only): enhanced authentication exchange."""

    TYPE: ClassVar[int] = 15
    reason_code: ReasonCode = ReasonCode.SUCCESS
    properties: Properties = field(default_factory=Properties)


Packet = (
    Connect
    | Connack
    | Publish
    | Puback
    | Pubrec
    | Pubrel
    | Pubcomp
    | Subscribe
    | Suback
    | Unsubscribe
    | Unsuback
    | Pingreq
    | Pingresp
    | Disconnect
    | Auth
)
