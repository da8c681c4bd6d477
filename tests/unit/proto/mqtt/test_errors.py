"""What the reader refuses (and with which error and reason code), and what encode refuses."""

from __future__ import annotations

import pytest

from iotmesh.core.errors import IotmeshError
from iotmesh.proto.mqtt import (
    Auth,
    Connack,
    Connect,
    EncodeError,
    MalformedPacket,
    MqttReader,
    Packet,
    PacketTooLarge,
    Pingreq,
    Properties,
    ProtocolError,
    Puback,
    Publish,
    ReasonCode,
    Suback,
    Subscribe,
    Subscription,
    Unsuback,
    Unsubscribe,
    UnsupportedProtocolVersion,
    Will,
    encode,
)
from iotmesh.proto.mqtt._wire import varint


def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


def read(wire: bytes, version: int | None) -> list[Packet]:
    reader = MqttReader(max_packet_size=1024, version=version)
    reader.feed(wire)
    return reader.read_packets()


def read_until_error(reader: MqttReader) -> None:
    while reader.next_packet() is not None:
        pass


CONNECT_5 = "10 0D 00 04 4D 51 54 54 05 02 00 00 00 00 00"  # clean start, no props, id ""
CONNECT_4 = "10 0C 00 04 4D 51 54 54 04 02 00 00 00 00"

MALFORMED: list[tuple[str, int | None, str]] = [
    # fixed header
    ("varint-5-bytes", 4, "30 FF FF FF FF 01"),
    ("varint-not-shortest", 4, "30 80 00"),
    ("reserved-type-0", 4, "00 00"),
    ("auth-in-311", 4, "F0 00"),
    ("pubrel-flags-0", 4, "60 02 00 01"),
    ("subscribe-flags-0", 4, "80 06 00 01 00 01 61 00"),
    ("unsubscribe-flags-0", 5, "A0 06 00 01 00 00 01 61"),
    ("puback-flags-2", 5, "42 02 00 01"),
    ("pingreq-flags", 4, "C1 00"),
    ("connect-flags", None, "11" + CONNECT_4[2:]),
    # PUBLISH
    ("publish-qos3", 4, "36 05 00 01 74 00 01"),
    ("publish-dup-qos0", 4, "38 03 00 01 74"),
    ("publish-pid-0", 4, "32 05 00 01 74 00 00"),
    ("publish-bad-utf8", 4, "30 05 00 03 61 FF 62"),
    ("publish-surrogate", 4, "30 05 00 03 ED A0 80"),
    ("publish-overlong", 4, "30 04 00 02 C0 AF"),
    ("publish-nul", 4, "30 05 00 03 61 00 62"),
    ("publish-wildcard+", 4, "30 05 00 03 61 2F 2B"),
    ("publish-wildcard#", 5, "30 06 00 03 61 2F 23 00"),
    ("publish-empty-topic-311", 4, "30 02 00 00"),
    ("publish-topic-past-end", 4, "30 03 00 05 74"),
    ("publish-no-pid", 4, "32 03 00 01 74"),
    ("publish-5-no-props-length", 5, "30 03 00 01 74"),
    ("publish-5-props-past-end", 5, "30 05 00 01 74 09 23"),
    ("publish-5-unknown-property", 5, "30 06 00 01 74 02 7F 00"),
    ("publish-5-prop-not-allowed", 5, "30 08 00 01 74 05 11 00 00 00 01"),
    # acks and others
    ("puback-pid-0", 4, "40 02 00 00"),
    ("puback-311-long", 4, "40 03 00 01 00"),
    ("puback-short", 4, "40 01 00"),
    ("puback-5-bad-reason", 5, "40 03 00 01 92"),
    ("pubrel-5-bad-reason", 5, "62 03 00 01 10"),
    ("puback-5-trailing", 5, "40 05 00 01 00 00 00"),
    ("pingreq-body", 4, "C0 01 00"),
    ("disconnect-311-body", 4, "E0 01 00"),
    ("disconnect-5-bad-reason", 5, "E0 01 01"),
    ("connack-311-code-6", 4, "20 02 00 06"),
    ("connack-reserved-flags", 4, "20 02 02 00"),
    ("suback-no-codes", 4, "90 02 00 01"),
    ("suback-311-bad-code", 4, "90 03 00 01 03"),
    ("suback-5-bad-code", 5, "90 04 00 01 00 10"),
    ("unsuback-311-codes", 4, "B0 03 00 01 00"),
    ("unsuback-5-no-codes", 5, "B0 03 00 01 00"),
    # SUBSCRIBE options and filters
    ("subscribe-311-reserved-bits", 4, "82 06 00 01 00 01 61 04"),
    ("subscribe-311-qos3", 4, "82 06 00 01 00 01 61 03"),
    ("subscribe-5-reserved-bits", 5, "82 07 00 01 00 00 01 61 40"),
    ("subscribe-bad-filter", 4, "82 0A 00 01 00 05 61 2F 23 2F 62 00"),
    ("subscribe-partial-plus", 4, "82 07 00 01 00 02 61 2B 00"),
    ("subscribe-empty-filter", 4, "82 05 00 01 00 00 00"),
    ("subscribe-shared-no-filter", 5, "82 0E 00 01 00 00 08 24 73 68 61 72 65 2F 67 00"),
    ("subscribe-missing-options", 4, "82 05 00 01 00 01 61"),
    ("unsubscribe-bad-filter", 4, "A2 06 00 01 00 02 23 61"),
]


@pytest.mark.parametrize(
    ("version", "wire"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED]
)
def test_malformed(version: int | None, wire: str) -> None:
    with pytest.raises(MalformedPacket) as info:
        read(h(wire), version)
    assert info.value.reason_code == ReasonCode.MALFORMED_PACKET
    assert info.value.packet_type == h(wire)[0] >> 4


PROTOCOL: list[tuple[str, int | None, str]] = [
    ("subscribe-none", 4, "82 02 00 01"),
    ("subscribe-5-none", 5, "82 03 00 01 00"),
    ("unsubscribe-none", 4, "A2 02 00 01"),
    ("subscribe-5-retain-handling-3", 5, "82 07 00 01 00 00 01 61 30"),
    ("subscribe-5-qos3", 5, "82 07 00 01 00 00 01 61 03"),
    ("subscribe-5-no-local-shared", 5, "82 10 00 01 00 00 0A 24 73 68 61 72 65 2F 67 2F 74 04"),
    ("subscribe-5-two-subscription-ids", 5, "82 0B 00 01 04 0B 01 0B 02 00 01 61 00"),
    ("publish-5-topic-alias-0", 5, "30 07 00 01 74 03 23 00 00"),
    ("publish-5-empty-topic-no-alias", 5, "30 03 00 00 00"),
    ("publish-5-payload-format-2", 5, "30 06 00 01 74 02 01 02"),
    ("connack-5-maximum-qos-2", 5, "20 05 00 00 02 24 02"),
    ("connack-5-receive-maximum-0", 5, "20 06 00 00 03 21 00 00"),
    ("connack-session-on-refusal", 4, "20 02 01 05"),
    ("subscription-id-0", 5, "82 09 00 01 02 0B 00 00 01 61 00"),
    # the server side's order of things
    ("publish-before-connect", None, "30 03 00 01 74"),
    ("pingreq-before-connect", None, "C0 00"),
    ("second-connect", None, CONNECT_4 + CONNECT_4),
    ("connack-from-client", None, CONNECT_5 + "20 03 00 00 00"),
    ("suback-from-client", None, CONNECT_4 + "90 03 00 01 00"),
    ("pingresp-from-client", None, CONNECT_4 + "D0 00"),
    ("subscription-id-from-client", None, CONNECT_5 + "30 06 00 01 74 02 0B 01"),
]


@pytest.mark.parametrize(
    ("version", "wire"), [c[1:] for c in PROTOCOL], ids=[c[0] for c in PROTOCOL]
)
def test_protocol_errors(version: int | None, wire: str) -> None:
    reader = MqttReader(max_packet_size=1024, version=version)
    reader.feed(h(wire))
    with pytest.raises(ProtocolError) as info:
        read_until_error(reader)
    assert type(info.value) is ProtocolError
    assert info.value.reason_code == ReasonCode.PROTOCOL_ERROR


def test_duplicate_property_is_a_protocol_error() -> None:
    # message expiry interval twice
    wire = h("30 0E 00 01 74 0A 02 00 00 00 01 02 00 00 00 02")
    with pytest.raises(ProtocolError, match="twice"):
        read(wire, 5)


@pytest.mark.parametrize(
    ("wire", "level", "name"),
    [
        ("10 0C 00 06 4D 51 49 73 64 70 03 02 00 00 00 00", 3, "MQIsdp"),
        ("10 0A 00 04 4D 51 54 54 03 02 00 00 00 00", 3, "MQTT"),
        ("10 0A 00 04 4D 51 54 54 06 02 00 00 00 00", 6, "MQTT"),
    ],
)
def test_unsupported_protocol_version(wire: str, level: int, name: str) -> None:
    fixed = h(wire)
    fixed = fixed[:1] + bytes([len(fixed) - 2]) + fixed[2:]
    with pytest.raises(UnsupportedProtocolVersion) as info:
        read(fixed, None)
    assert info.value.level == level
    assert info.value.protocol_name == name
    assert info.value.reason_code == ReasonCode.UNSUPPORTED_PROTOCOL_VERSION
    # the server answers in the shape a v3.1.1 client understands: return code 1
    answer = Connack(False, ReasonCode(info.value.reason_code))
    assert encode(answer, 4) == h("20 02 00 01")


@pytest.mark.parametrize(
    ("name", "wire"),
    [
        ("unknown-name", "10 0C 00 04 4D 51 54 58 04 02 00 00 00 00"),
        ("reserved-flag", "10 0C 00 04 4D 51 54 54 04 03 00 00 00 00"),
        ("will-qos-no-will", "10 0C 00 04 4D 51 54 54 04 0A 00 00 00 00"),
        ("will-retain-no-will", "10 0C 00 04 4D 51 54 54 04 22 00 00 00 00"),
        ("will-qos-3", "10 11 00 04 4D 51 54 54 04 1E 00 00 00 00 00 01 74 00 00"),
        ("311-password-no-user", "10 0E 00 04 4D 51 54 54 04 42 00 00 00 00 00 00"),
        ("will-topic-wildcard", "10 11 00 04 4D 51 54 54 04 06 00 00 00 00 00 01 23 00 00"),
        ("trailing-bytes", "10 0D 00 04 4D 51 54 54 04 02 00 00 00 00 00"),
        (
            "5-will-prop-not-allowed",
            "10 16 00 04 4D 51 54 54 05 06 00 00 00 00 00 03 23 00 01 00 01 74 00 00",
        ),
    ],
)
def test_malformed_connect(name: str, wire: str) -> None:
    fixed = h(wire)
    assert fixed[1] == len(fixed) - 2, "test data: remaining length"
    with pytest.raises(MalformedPacket):
        read(fixed, None)


def test_v5_allows_a_password_without_a_user_name() -> None:
    wire = h("10 0F 00 04 4D 51 54 54 05 42 00 00 00 00 00 00 00")
    assert read(wire, None) == [Connect(5, "", True, 0, None, b"")]


def test_packet_too_large_before_the_body_arrives() -> None:
    reader = MqttReader(max_packet_size=100, version=4)
    reader.feed(h("32 FF 7F"))  # announces 16383 bytes; only the header is here
    with pytest.raises(PacketTooLarge) as info:
        reader.next_packet()
    assert info.value.reason_code == ReasonCode.PACKET_TOO_LARGE
    assert info.value.size == 3 + 16383
    assert info.value.limit == 100
    assert info.value.packet_type == 3
    assert reader.buffered == 3


def test_packet_too_large_counts_the_whole_packet() -> None:
    fits = encode(Publish("t", bytes(95)), 4)  # 2 + 2 + 1 + 95 = 100 bytes
    assert len(fits) == 100
    reader = MqttReader(max_packet_size=100, version=4)
    reader.feed(fits)
    assert reader.next_packet() == Publish("t", bytes(95))
    reader.feed(encode(Publish("t", bytes(96)), 4)[:2])
    with pytest.raises(PacketTooLarge):
        reader.next_packet()


def test_packet_too_large_on_connect_in_server_mode() -> None:
    reader = MqttReader(max_packet_size=64)
    reader.feed(h("10 80 02"))
    with pytest.raises(PacketTooLarge):
        reader.next_packet()


def test_first_byte_alone_is_not_judged() -> None:
    reader = MqttReader(version=4)
    reader.feed(b"\x30")
    assert reader.next_packet() is None
    reader.feed(b"\xff\xff")  # still an incomplete remaining length
    assert reader.next_packet() is None


def test_errors_are_final() -> None:
    reader = MqttReader(version=4)
    reader.feed(h("C1 00"))
    with pytest.raises(MalformedPacket) as first:
        reader.next_packet()
    reader.feed(h("C0 00"))
    with pytest.raises(MalformedPacket) as again:
        reader.next_packet()
    assert again.value is first.value


def test_read_packets_returns_the_good_packets_before_the_bad_one() -> None:
    reader = MqttReader(version=4)
    reader.feed(h("C0 00  40 02 00 01  C1 00  C0 00"))
    assert reader.read_packets() == [Pingreq(), Puback(1)]
    with pytest.raises(MalformedPacket):
        reader.read_packets()


def test_every_error_is_an_iotmesh_error() -> None:
    for cls in (MalformedPacket, PacketTooLarge, ProtocolError, UnsupportedProtocolVersion):
        assert issubclass(cls, IotmeshError)
    assert issubclass(EncodeError, IotmeshError)


def test_reader_arguments() -> None:
    with pytest.raises(ValueError, match="protocol level"):
        MqttReader(version=3)
    reader = MqttReader()
    reader.set_version(5)
    assert reader.version == 5
    reader.feed(h("F0 00"))
    assert reader.next_packet() == Auth()


# -- encode refuses what the decoder would refuse -------------------------------------------

BAD_PACKETS: list[tuple[str, int, object]] = [
    ("qos0-with-pid", 4, Publish("t", b"", 0, False, False, 1)),
    ("qos0-dup", 4, Publish("t", b"", 0, False, True)),
    ("qos1-without-pid", 4, Publish("t", b"", 1)),
    ("pid-0", 4, Publish("t", b"", 1, False, False, 0)),
    ("pid-too-big", 4, Puback(65536)),
    ("qos3", 4, Publish("t", b"", 3, False, False, 1)),
    ("wildcard-topic", 4, Publish("a/+", b"")),
    ("empty-topic-311", 4, Publish("", b"")),
    ("empty-topic-5-no-alias", 5, Publish("", b"")),
    ("nul-topic", 5, Publish("a\x00", b"")),
    ("surrogate-topic", 5, Publish("a\udc80", b"")),
    ("str-payload", 4, Publish("t", "text")),  # type: ignore[arg-type]
    ("topic-alias-0", 5, Publish("t", b"", properties=Properties(topic_alias=0))),
    ("prop-not-allowed", 5, Publish("t", b"", properties=Properties(session_expiry_interval=1))),
    ("prop-out-of-range", 5, Connect(5, properties=Properties(receive_maximum=70000))),
    ("reason-not-allowed", 5, Puback(1, ReasonCode.PACKET_IDENTIFIER_NOT_FOUND)),
    ("auth-311", 4, Auth()),
    ("connect-level-mismatch", 5, Connect(4)),
    ("311-password-without-user", 4, Connect(4, password=b"x")),
    ("will-wildcard", 4, Connect(4, will=Will("a/#"))),
    ("will-qos-3", 4, Connect(4, will=Will("a", b"", 3))),
    ("session-present-refused", 5, Connack(True, ReasonCode.NOT_AUTHORIZED)),
    ("subscribe-empty", 4, Subscribe(1, [])),
    ("subscribe-bad-filter", 4, Subscribe(1, [Subscription("a#")])),
    ("subscribe-rh-3", 5, Subscribe(1, [Subscription("a", 0, False, False, 3)])),
    ("no-local-shared", 5, Subscribe(1, [Subscription("$share/g/a", 0, True)])),
    (
        "two-sub-ids-in-subscribe",
        5,
        Subscribe(1, [Subscription("a")], Properties(subscription_identifiers=[1, 2])),
    ),
    ("suback-empty", 4, Suback(1, [])),
    ("unsubscribe-empty", 4, Unsubscribe(1, [])),
    ("unsuback-5-empty", 5, Unsuback(1, [])),
    ("keep-alive-range", 4, Connect(4, keep_alive=70000)),
    ("user-property-shape", 5, Puback(1, properties=Properties(user_properties=[("a",)]))),  # type: ignore[list-item]
    ("not-a-packet", 5, object()),
    ("version-3", 3, Puback(1)),
]


@pytest.mark.parametrize(
    ("version", "packet"), [c[1:] for c in BAD_PACKETS], ids=[c[0] for c in BAD_PACKETS]
)
def test_encode_refuses(version: int, packet: Packet) -> None:
    with pytest.raises(EncodeError):
        encode(packet, version)


def test_encode_long_strings_and_payloads() -> None:
    with pytest.raises(EncodeError):
        encode(Connect(4, "x" * 65536), 4)
    with pytest.raises(EncodeError):  # over the 268,435,455-byte remaining length
        varint(268_435_456)
    assert varint(268_435_455) == h("FF FF FF 7F")
