"""MQTT reason codes (v5, spec 2.4) and the v3.1.1 CONNACK return codes.

Rules: one `ReasonCode` value stands for every v5 meaning of its byte (0x00 is Success,
Normal disconnection and Granted QoS 0 alike), so members are named after the most common
use and aliases name the rest. Each packet type may carry only the codes its section of
the spec lists (`ALLOWED`); the decoder refuses any other byte as malformed rather than
guessing, and the encoder refuses to send one.

Code in the rest of iotmesh speaks v5 only: the codec maps to and from the v3.1.1 forms
(CONNACK return codes 0-5, SUBACK 0x00/0x01/0x02/0x80) at the wire, using
`connack_code_311` and `reason_from_311`, so a server decides once, in v5 terms.
"""

from __future__ import annotations

from enum import IntEnum


class ReasonCode(IntEnum):
    """Every MQTT 5 reason code."""

    SUCCESS = 0x00
    NORMAL_DISCONNECTION = 0x00
    GRANTED_QOS_0 = 0x00
    GRANTED_QOS_1 = 0x01
    GRANTED_QOS_2 = 0x02
    DISCONNECT_WITH_WILL_MESSAGE = 0x04
    NO_MATCHING_SUBSCRIBERS = 0x10
    NO_SUBSCRIPTION_EXISTED = 0x11
    CONTINUE_AUTHENTICATION = 0x18
    RE_AUTHENTICATE = 0x19
    UNSPECIFIED_ERROR = 0x80
    MALFORMED_PACKET = 0x81
    PROTOCOL_ERROR = 0x82
    IMPLEMENTATION_SPECIFIC_ERROR = 0x83
    UNSUPPORTED_PROTOCOL_VERSION = 0x84
    CLIENT_IDENTIFIER_NOT_VALID = 0x85
    BAD_USER_NAME_OR_PASSWORD = 0x86
    NOT_AUTHORIZED = 0x87
    SERVER_UNAVAILABLE = 0x88
    SERVER_BUSY = 0x89
    BANNED = 0x8A
    SERVER_SHUTTING_DOWN = 0x8B
    BAD_AUTHENTICATION_METHOD = 0x8C
    KEEP_ALIVE_TIMEOUT = 0x8D
    SESSION_TAKEN_OVER = 0x8E
    TOPIC_FILTER_INVALID = 0x8F
    TOPIC_NAME_INVALID = 0x90
    PACKET_IDENTIFIER_IN_USE = 0x91
    PACKET_IDENTIFIER_NOT_FOUND = 0x92
    RECEIVE_MAXIMUM_EXCEEDED = 0x93
    TOPIC_ALIAS_INVALID = 0x94
    PACKET_TOO_LARGE = 0x95
    MESSAGE_RATE_TOO_HIGH = 0x96
    QUOTA_EXCEEDED = 0x97
    ADMINISTRATIVE_ACTION = 0x98
    PAYLOAD_FORMAT_INVALID = 0x99
    RETAIN_NOT_SUPPORTED = 0x9A
    QOS_NOT_SUPPORTED = 0x9B
    USE_ANOTHER_SERVER = 0x9C
    SERVER_MOVED = 0x9D
    SHARED_SUBSCRIPTIONS_NOT_SUPPORTED = 0x9E
    CONNECTION_RATE_EXCEEDED = 0x9F
    MAXIMUM_CONNECT_TIME = 0xA0
    SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED = 0xA1
    WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED = 0xA2

    @property
    def is_error(self) -> bool:
        """Codes of 0x80 and above report a failure (spec 2.4)."""
        return self.value >= 0x80


class ConnackCode311(IntEnum):
    """MQTT 3.1.1 CONNACK return codes (spec 3.1.1, 3.2.2.3)."""

    ACCEPTED = 0
    UNACCEPTABLE_PROTOCOL_VERSION = 1
    IDENTIFIER_REJECTED = 2
    SERVER_UNAVAILABLE = 3
    BAD_USER_NAME_OR_PASSWORD = 4
    NOT_AUTHORIZED = 5


R = ReasonCode

# Which reason codes each packet type may carry (v5 spec sections 3.2.2.2, 3.4.2.1,
# 3.5.2.1, 3.6.2.1, 3.7.2.1, 3.9.3, 3.11.3, 3.14.2.1, 3.15.2.1), keyed by packet type.
_PUBACK = frozenset({0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99})
_PUBREL = frozenset({0x00, 0x92})
ALLOWED: dict[int, frozenset[int]] = {
    2: frozenset(
        {0x00, *range(0x80, 0x8B), 0x8C, 0x90, 0x95, 0x97, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F}
    ),
    4: _PUBACK,
    5: _PUBACK,
    6: _PUBREL,
    7: _PUBREL,
    9: frozenset({0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2}),
    11: frozenset({0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91}),
    14: frozenset({0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, *range(0x8B, 0xA3)})
    - {0x8C, 0x91, 0x92},
    15: frozenset({0x00, 0x18, 0x19}),
}

# v3.1.1 SUBACK knows only the granted QoS and "Failure" (0x80).
SUBACK_311 = frozenset({0x00, 0x01, 0x02, 0x80})

_TO_311: dict[int, ConnackCode311] = {
    R.SUCCESS: ConnackCode311.ACCEPTED,
    R.UNSUPPORTED_PROTOCOL_VERSION: ConnackCode311.UNACCEPTABLE_PROTOCOL_VERSION,
    R.CLIENT_IDENTIFIER_NOT_VALID: ConnackCode311.IDENTIFIER_REJECTED,
    R.BAD_USER_NAME_OR_PASSWORD: ConnackCode311.BAD_USER_NAME_OR_PASSWORD,
    R.BAD_AUTHENTICATION_METHOD: ConnackCode311.BAD_USER_NAME_OR_PASSWORD,
    R.NOT_AUTHORIZED: ConnackCode311.NOT_AUTHORIZED,
    R.BANNED: ConnackCode311.NOT_AUTHORIZED,
}

_FROM_311: dict[int, ReasonCode] = {
    ConnackCode311.ACCEPTED: R.SUCCESS,
    ConnackCode311.UNACCEPTABLE_PROTOCOL_VERSION: R.UNSUPPORTED_PROTOCOL_VERSION,
    ConnackCode311.IDENTIFIER_REJECTED: R.CLIENT_IDENTIFIER_NOT_VALID,
    ConnackCode311.SERVER_UNAVAILABLE: R.SERVER_UNAVAILABLE,
    ConnackCode311.BAD_USER_NAME_OR_PASSWORD: R.BAD_USER_NAME_OR_PASSWORD,
    ConnackCode311.NOT_AUTHORIZED: R.NOT_AUTHORIZED,
}


def connack_code_311(reason: int) -> ConnackCode311:
    """The v3.1.1 CONNACK return code closest to a v5 CONNACK reason code.

    v3.1.1 has no words for most v5 refusals; anything without a closer match (server
    busy, quota, use another server, ...) becomes 3, "server unavailable", which tells
    the client to retry later - the safest reading of every remaining failure.
    """
    return _TO_311.get(reason, ConnackCode311.SERVER_UNAVAILABLE)


def reason_from_311(code: int) -> ReasonCode:
    """The v5 reason code for a v3.1.1 CONNACK return code (0-5).

    Raises:
        KeyError: `code` is not a v3.1.1 return code (callers check the range first).
    """
    return _FROM_311[code]
