"""A strict, fast, sans-IO codec for MQTT 3.1.1 and 5.0.

Packets are plain values (`packets`), `encode(packet, version)` makes bytes, and
`MqttReader` turns a byte stream into packets. Topic syntax, matching and the routing
trie live in `topics`. Errors: see `errors` (every one derives from `MqttError`).
"""

from __future__ import annotations

from .codec import MAX_PACKET_SIZE, MqttReader, encode
from .errors import (
    EncodeError,
    InvalidTopic,
    MalformedPacket,
    MqttError,
    PacketTooLarge,
    ProtocolError,
    UnsupportedProtocolVersion,
)
from .packets import (
    Auth,
    Connack,
    Connect,
    Disconnect,
    Packet,
    PacketType,
    Pingreq,
    Pingresp,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Suback,
    Subscribe,
    Subscription,
    Unsuback,
    Unsubscribe,
    Will,
)
from .properties import Properties
from .reason_codes import ConnackCode311, ReasonCode, connack_code_311, reason_from_311
from .topics import (
    SharedSubscription,
    TopicTree,
    parse_shared,
    topic_matches,
    validate_topic_filter,
    validate_topic_name,
)

__all__ = [
    "MAX_PACKET_SIZE",
    "Auth",
    "Connack",
    "ConnackCode311",
    "Connect",
    "Disconnect",
    "EncodeError",
    "InvalidTopic",
    "MalformedPacket",
    "MqttError",
    "MqttReader",
    "Packet",
    "PacketTooLarge",
    "PacketType",
    "Pingreq",
    "Pingresp",
    "Properties",
    "ProtocolError",
    "Puback",
    "Pubcomp",
    "Publish",
    "Pubrec",
    "Pubrel",
    "ReasonCode",
    "SharedSubscription",
    "Suback",
    "Subscribe",
    "Subscription",
    "TopicTree",
    "Unsuback",
    "Unsubscribe",
    "UnsupportedProtocolVersion",
    "Will",
    "connack_code_311",
    "encode",
    "parse_shared",
    "reason_from_311",
    "topic_matches",
    "validate_topic_filter",
    "validate_topic_name",
]
