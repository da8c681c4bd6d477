"""The errors of the MQTT codec, and who is to blame for each.

    IotmeshError
    └── MqttError                    anything the codec refuses
        ├── ProtocolError            the REMOTE side broke a rule (reason_code 0x82 or finer)
        │   ├── MalformedPacket      ... the bytes cannot be parsed as the spec says (0x81)
        │   ├── PacketTooLarge       ... declared size over our limit (0x95)
        │   └── UnsupportedProtocolVersion  CONNECT asked for a level we do not speak (0x84)
        ├── EncodeError              WE built a packet the spec does not allow (local fault)
        └── InvalidTopic             a topic name or filter breaks the syntax rules

Rules: a decoder error always means "close the connection" - MQTT has no way to skip a bad
packet - so each `ProtocolError` carries the `reason_code` a v5 server puts in its
DISCONNECT (or CONNACK, before the session exists). Decoding never lets a Python error
(IndexError, UnicodeDecodeError, ValueError, struct.error ...) escape: those would hide
whose fault it was and tempt callers into catching `Exception`.
"""

from __future__ import annotations

from iotmesh.core.errors import IotmeshError


class MqttError(IotmeshError):
    """Root of the MQTT codec errors."""


class ProtocolError(MqttError):
    """The remote side broke the protocol; answer with `reason_code`, then close.

    Attributes:
        reason_code: the MQTT 5 reason code for DISCONNECT/CONNACK (int, see ReasonCode).
        packet_type: the fixed-header packet type being parsed, when known.
    """

    default_reason_code = 0x82

    def __init__(
        self, message: str, *, reason_code: int | None = None, packet_type: int | None = None
    ) -> None:
        super().__init__(message)
        self.reason_code = self.default_reason_code if reason_code is None else reason_code
        self.packet_type = packet_type


class MalformedPacket(ProtocolError):
    """The bytes do not follow the packet grammar (reason code 0x81)."""

    default_reason_code = 0x81


class PacketTooLarge(ProtocolError):
    """The packet's declared size exceeds the reader's limit (reason code 0x95).

    Raised from the fixed header alone, before the body is buffered.
    """

    default_reason_code = 0x95

    def __init__(self, size: int, limit: int, *, packet_type: int | None = None) -> None:
        super().__init__(
            f"packet of {size} bytes is over the limit of {limit} bytes", packet_type=packet_type
        )
        self.size = size
        self.limit = limit


class UnsupportedProtocolVersion(ProtocolError):
    """CONNECT named a protocol level we do not support (0x84; v3.1.1 CONNACK code 1).

    `level` is the level the client asked for, so the server can answer in a form that
    client understands (a v3.1.1-shaped CONNACK for anything but level 5).
    """

    default_reason_code = 0x84

    def __init__(self, level: int, protocol_name: str = "MQTT") -> None:
        super().__init__(f"unsupported protocol {protocol_name!r} level {level}", packet_type=1)
        self.level = level
        self.protocol_name = protocol_name


class EncodeError(MqttError):
    """A packet given to `encode` cannot be put on the wire (our own fault)."""


class InvalidTopic(MqttError):
    """A topic name or topic filter breaks the MQTT syntax rules (spec 4.7).

    The decoder turns this into `MalformedPacket`, the encoder into `EncodeError`.
    """

    def __init__(self, topic: str, reason: str) -> None:
        super().__init__(f"invalid topic {topic!r}: {reason}")
        self.topic = topic
        self.reason = reason
