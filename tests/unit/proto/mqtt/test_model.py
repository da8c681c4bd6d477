"""Reason codes, their v3.1.1 mapping, and the `Properties` value type."""

from __future__ import annotations

import pytest

from iotmesh.proto.mqtt import (
    ConnackCode311,
    Properties,
    ReasonCode,
    connack_code_311,
    reason_from_311,
)
from iotmesh.proto.mqtt.properties import BY_ID, PROPERTY_DEFS
from iotmesh.proto.mqtt.reason_codes import ALLOWED

R = ReasonCode


def test_every_mqtt5_reason_code_exists() -> None:
    values = {code.value for code in ReasonCode}
    expected = {0x00, 0x01, 0x02, 0x04, 0x10, 0x11, 0x18, 0x19, *range(0x80, 0xA3)}
    assert values == expected
    members = ReasonCode.__members__  # one member, three names
    assert members["NORMAL_DISCONNECTION"] is members["GRANTED_QOS_0"] is R.SUCCESS
    assert R(0x95) is R.PACKET_TOO_LARGE
    assert R.NOT_AUTHORIZED.is_error
    assert not R.GRANTED_QOS_2.is_error
    for allowed in ALLOWED.values():
        assert allowed <= values


@pytest.mark.parametrize(
    ("reason", "code"),
    [
        (R.SUCCESS, 0),
        (R.UNSUPPORTED_PROTOCOL_VERSION, 1),
        (R.CLIENT_IDENTIFIER_NOT_VALID, 2),
        (R.SERVER_UNAVAILABLE, 3),
        (R.SERVER_BUSY, 3),
        (R.BAD_USER_NAME_OR_PASSWORD, 4),
        (R.NOT_AUTHORIZED, 5),
        (R.BANNED, 5),
        (R.QUOTA_EXCEEDED, 3),
    ],
)
def test_connack_code_311(reason: ReasonCode, code: int) -> None:
    assert connack_code_311(reason) == code
    assert isinstance(connack_code_311(reason), ConnackCode311)


def test_reason_from_311_round_trips_the_six_codes() -> None:
    for code in ConnackCode311:
        assert connack_code_311(reason_from_311(code)) == code


def test_property_table() -> None:
    assert len(PROPERTY_DEFS) == 27
    assert sorted(BY_ID) == [
        0x01, 0x02, 0x03, 0x08, 0x09, 0x0B, 0x11, 0x12, 0x13, 0x15, 0x16, 0x17, 0x18, 0x19,
        0x1A, 0x1C, 0x1F, 0x21, 0x22, 0x23, 0x24, 0x25, 0x26, 0x27, 0x28, 0x29, 0x2A,
    ]  # fmt: skip
    for d in PROPERTY_DEFS:
        assert hasattr(Properties, d.name)


def test_properties_value_semantics() -> None:
    p = Properties(topic_alias=3, user_properties=[("a", "b")])
    assert p.topic_alias == 3
    assert p.content_type is None
    assert p == Properties(user_properties=[("a", "b")], topic_alias=3)
    assert p != Properties(topic_alias=3)
    assert repr(p) == "Properties(topic_alias=3, user_properties=[('a', 'b')])"
    p.topic_alias = None
    assert p == Properties(user_properties=[("a", "b")])
    empty = Properties()
    assert empty.is_empty()
    empty.subscription_identifiers.append(4)  # lists are live
    assert empty.subscription_identifiers == [4]
    assert not empty.is_empty()
    reads = Properties()
    assert reads.user_properties == []  # reading creates an empty list ...
    assert reads.is_empty()  # ... which is still empty
    assert reads == Properties()
    assert Properties() != object()
