"""Every packet type against bytes written by hand from the MQTT 3.1.1 and 5.0 specs.

Each case is checked both ways: encode(packet) gives the bytes, and the reader turns the
bytes back into the packet.
"""

from __future__ import annotations

import pytest

from iotmesh.proto.mqtt import (
    Auth,
    Connack,
    Connect,
    Disconnect,
    MqttReader,
    Packet,
    Pingreq,
    Pingresp,
    Properties,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    ReasonCode,
    Suback,
    Subscribe,
    Subscription,
    Unsuback,
    Unsubscribe,
    Will,
    encode,
)

R = ReasonCode


def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


def decode_one(data: bytes, version: int) -> Packet:
    reader = MqttReader(version=version)
    reader.feed(data)
    packet = reader.next_packet()
    assert packet is not None
    assert reader.next_packet() is None
    assert reader.buffered == 0
    return packet


CASES: list[tuple[str, int, Packet, str]] = [
    # -- CONNECT --------------------------------------------------------------------------
    (
        "connect-311-minimal",
        4,
        Connect(4, "abc", True, 60),
        "10 0F  00 04 4D 51 54 54  04  02  00 3C  00 03 61 62 63",
    ),
    (
        "connect-311-will-user-pass",
        4,
        Connect(4, "c", False, 0, "u", b"pw", Will("w/t", b"x", 2, False)),
        # flags: user 0x80 | password 0x40 | will QoS 2 0x10 | will 0x04 = 0xD4
        "10 1C  00 04 4D 51 54 54  04  D4  00 00  00 01 63  00 03 77 2F 74  00 01 78"
        "  00 01 75  00 02 70 77",
    ),
    (
        "connect-5-will-properties",
        5,
        Connect(
            5,
            "c1",
            True,
            10,
            "u",
            b"p",
            Will("w", b"x", 1, True, Properties(will_delay_interval=5)),
            Properties(session_expiry_interval=120),
        ),
        # flags: user | password | will retain 0x20 | will QoS 1 0x08 | will | clean = 0xEE
        "10 26  00 04 4D 51 54 54  05  EE  00 0A  05 11 00 00 00 78  00 02 63 31"
        "  05 18 00 00 00 05  00 01 77  00 01 78  00 01 75  00 01 70",
    ),
    (
        "connect-5-password-without-user",
        5,
        Connect(5, "", True, 0, None, b""),
        "10 0F  00 04 4D 51 54 54  05  42  00 00  00  00 00  00 00",
    ),
    # -- CONNACK --------------------------------------------------------------------------
    ("connack-311-session", 4, Connack(True, R.SUCCESS), "20 02 01 00"),
    ("connack-311-refused", 4, Connack(False, R.NOT_AUTHORIZED), "20 02 00 05"),
    ("connack-311-bad-version", 4, Connack(False, R.UNSUPPORTED_PROTOCOL_VERSION), "20 02 00 01"),
    ("connack-5", 5, Connack(False, R.SUCCESS), "20 03 00 00 00"),
    (
        "connack-5-properties",
        5,
        Connack(True, R.SUCCESS, Properties(maximum_qos=1, retain_available=0)),
        "20 07 01 00 04 24 01 25 00",
    ),
    ("connack-5-refused", 5, Connack(False, R.BANNED), "20 03 00 8A 00"),
    # -- PUBLISH --------------------------------------------------------------------------
    (
        "publish-311-qos1-retain",
        4,
        Publish("a/b", b"hi", 1, True, False, 10),
        "33 09 00 03 61 2F 62 00 0A 68 69",
    ),
    ("publish-311-qos0", 4, Publish("a/b", b"hi"), "30 07 00 03 61 2F 62 68 69"),
    (
        "publish-311-qos2-dup",
        4,
        Publish("t", b"", 2, False, True, 0xFFFF),
        "3C 05 00 01 74 FF FF",
    ),
    ("publish-5-qos0", 5, Publish("a/b", b"hi"), "30 08 00 03 61 2F 62 00 68 69"),
    (
        "publish-5-alias-empty-topic",
        5,
        Publish("", b"x", properties=Properties(topic_alias=5)),
        "30 07 00 00 03 23 00 05 78",
    ),
    (
        "publish-5-user-properties-subscription-ids",
        5,
        Publish(
            "t",
            b"",
            1,
            False,
            False,
            1,
            Properties(user_properties=[("k", "v")], subscription_identifiers=[1, 200]),
        ),
        # props: 26 00 01 6B 00 01 76 (7)  0B 01 (2)  0B C8 01 (3)  = 12
        "32 12 00 01 74 00 01 0C 26 00 01 6B 00 01 76 0B 01 0B C8 01",
    ),
    # -- PUBACK family --------------------------------------------------------------------
    ("puback-311", 4, Puback(1), "40 02 00 01"),
    ("pubrec-311", 4, Pubrec(7), "50 02 00 07"),
    ("pubrel-311", 4, Pubrel(7), "62 02 00 07"),
    ("pubcomp-311", 4, Pubcomp(7), "70 02 00 07"),
    ("puback-5-short", 5, Puback(1), "40 02 00 01"),
    ("puback-5-reason", 5, Puback(1, R.NO_MATCHING_SUBSCRIBERS), "40 03 00 01 10"),
    (
        "puback-5-reason-string",
        5,
        Puback(1, R.NO_MATCHING_SUBSCRIBERS, Properties(reason_string="no")),
        "40 09 00 01 10 05 1F 00 02 6E 6F",
    ),
    ("pubrel-5-not-found", 5, Pubrel(2, R.PACKET_IDENTIFIER_NOT_FOUND), "62 03 00 02 92"),
    # -- SUBSCRIBE / SUBACK ---------------------------------------------------------------
    (
        "subscribe-311",
        4,
        Subscribe(1, [Subscription("a/+", 1), Subscription("#", 0)]),
        "82 0C 00 01  00 03 61 2F 2B 01  00 01 23 00",
    ),
    (
        "subscribe-5-options",
        5,
        Subscribe(
            2,
            [Subscription("t/#", 2, True, True, 2)],
            Properties(subscription_identifiers=[5]),
        ),
        # options: QoS 2 | No Local 0x04 | Retain As Published 0x08 | Retain Handling 2<<4
        "82 0B 00 02  02 0B 05  00 03 74 2F 23 2E",
    ),
    (
        "subscribe-5-shared",
        5,
        Subscribe(3, [Subscription("$share/g/t", 1)]),
        "82 10 00 03  00  00 0A 24 73 68 61 72 65 2F 67 2F 74  01",
    ),
    ("suback-311", 4, Suback(1, [R.GRANTED_QOS_1, R.UNSPECIFIED_ERROR]), "90 04 00 01 01 80"),
    (
        "suback-5",
        5,
        Suback(2, [R.GRANTED_QOS_2, R.WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED]),
        "90 05 00 02 00 02 A2",
    ),
    # -- UNSUBSCRIBE / UNSUBACK -----------------------------------------------------------
    ("unsubscribe-311", 4, Unsubscribe(3, ["a/b"]), "A2 07 00 03 00 03 61 2F 62"),
    ("unsubscribe-5", 5, Unsubscribe(3, ["a/b"]), "A2 08 00 03 00 00 03 61 2F 62"),
    ("unsuback-311", 4, Unsuback(3), "B0 02 00 03"),
    ("unsuback-5", 5, Unsuback(3, [R.NO_SUBSCRIPTION_EXISTED]), "B0 04 00 03 00 11"),
    # -- PING, DISCONNECT, AUTH -----------------------------------------------------------
    ("pingreq-311", 4, Pingreq(), "C0 00"),
    ("pingresp-5", 5, Pingresp(), "D0 00"),
    ("disconnect-311", 4, Disconnect(), "E0 00"),
    ("disconnect-5-short", 5, Disconnect(), "E0 00"),
    ("disconnect-5-reason-only", 5, Disconnect(R.SESSION_TAKEN_OVER), "E0 01 8E"),
    (
        "disconnect-5-properties",
        5,
        Disconnect(R.NORMAL_DISCONNECTION, Properties(session_expiry_interval=0)),
        "E0 07 00 05 11 00 00 00 00",
    ),
    ("auth-5-short", 5, Auth(), "F0 00"),
    ("auth-5-reason-no-properties", 5, Auth(R.RE_AUTHENTICATE), "F0 02 19 00"),
    (
        "auth-5-continue",
        5,
        Auth(R.CONTINUE_AUTHENTICATION, Properties(authentication_method="SCRAM")),
        "F0 0A 18 08 15 00 05 53 43 52 41 4D",
    ),
]


@pytest.mark.parametrize(
    ("version", "packet", "wire"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_encode_gives_the_spec_bytes(version: int, packet: Packet, wire: str) -> None:
    assert encode(packet, version).hex(" ") == h(wire).hex(" ")


@pytest.mark.parametrize(
    ("version", "packet", "wire"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_decode_gives_the_packet(version: int, packet: Packet, wire: str) -> None:
    assert decode_one(h(wire), version) == packet


@pytest.mark.parametrize(
    ("version", "wire", "packet"),
    [
        # v5 long forms the encoder would shorten are still accepted
        (5, "40 04 00 01 00 00", Puback(1)),
        (5, "40 03 00 01 00", Puback(1)),
        (5, "E0 01 00", Disconnect()),
        (5, "E0 02 00 00", Disconnect()),
        (5, "F0 02 00 00", Auth()),
        (5, "F0 01 19", Auth(R.RE_AUTHENTICATE)),  # tolerated, as DISCONNECT's form
        # remaining length in two bytes (non-minimal forms are refused elsewhere)
        (4, "30 80 01 00 01 74" + " 00" * 125, Publish("t", bytes(125))),
    ],
)
def test_decode_accepts_longer_valid_forms(version: int, wire: str, packet: Packet) -> None:
    assert decode_one(h(wire), version) == packet


def test_v311_drops_what_it_cannot_carry() -> None:
    props = Properties(reason_string="why", user_properties=[("a", "b")])
    assert encode(Puback(1, R.QUOTA_EXCEEDED, props), 4) == h("40 02 00 01")
    assert encode(Disconnect(R.SERVER_SHUTTING_DOWN, props), 4) == h("E0 00")
    assert encode(Unsuback(1, [R.NO_SUBSCRIPTION_EXISTED], props), 4) == h("B0 02 00 01")
    assert encode(Publish("t", b"", properties=Properties(message_expiry_interval=9)), 4) == h(
        "30 03 00 01 74"
    )
    # v5 SUBACK failures become the one v3.1.1 failure code, 0x80
    assert encode(Suback(1, [R.NOT_AUTHORIZED, R.GRANTED_QOS_2]), 4) == h("90 04 00 01 80 02")
    # v5 CONNACK reasons become the nearest v3.1.1 return code
    assert encode(Connack(False, R.SERVER_BUSY), 4) == h("20 02 00 03")
    assert encode(Connack(False, R.BAD_USER_NAME_OR_PASSWORD), 4) == h("20 02 00 04")
    assert encode(Connack(False, R.CLIENT_IDENTIFIER_NOT_VALID), 4) == h("20 02 00 02")


def test_large_remaining_length_uses_four_bytes() -> None:
    payload = bytes(2_097_152)  # remaining length 2 + 1 + 2**21 = 2_097_155 needs 4 bytes
    wire = encode(Publish("t", payload), 4)
    assert wire[:5] == h("30 83 80 80 01")
    assert decode_one(wire, 4) == Publish("t", payload)
