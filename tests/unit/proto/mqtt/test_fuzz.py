"""Fuzzing: whatever bytes arrive, the reader raises only `MqttError` subclasses.

And what the decoder accepts the encoder can send back unchanged, so a mutated packet
that still parses is a valid packet, not something half-checked.
"""

from __future__ import annotations

import itertools

from hypothesis import example, given, settings
from hypothesis import strategies as st

from iotmesh.proto.mqtt import Connect, MqttError, MqttReader, Packet, encode

from . import strategies as s


def drain(reader: MqttReader, data: bytes, cuts: list[int] | None = None) -> list[Packet]:
    """Feed `data` (in pieces), collecting packets until an `MqttError` ends it."""
    out: list[Packet] = []
    points = sorted({c % (len(data) + 1) for c in cuts or []})
    bounds = [0, *points, len(data)]
    try:
        for a, b in itertools.pairwise(bounds):
            reader.feed(data[a:b])
            while packets := reader.read_packets():
                out.extend(packets)
    except MqttError:
        pass
    return out


def check_canonical(packets: list[Packet], version: int) -> None:
    """Every packet the reader produced re-encodes and decodes to itself."""
    for packet in packets:
        level = packet.protocol_level if isinstance(packet, Connect) else version
        reader = MqttReader(version=level)
        reader.feed(encode(packet, level))
        assert reader.read_packets() == [packet]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.sampled_from([None, 4, 5]))
@example(b"\x10\x0c\x00\x04MQTT\x05\x02\x00\x00\x00\x00\x00", None)
@example(b"\x30\xff\xff\xff\xff\x7f", 4)
@example(b"\x82\x04\x00\x01\x00\x00", 5)
def test_arbitrary_bytes_raise_only_mqtt_errors(data: bytes, version: int | None) -> None:
    reader = MqttReader(max_packet_size=4096, version=version)
    packets = drain(reader, data)
    check_canonical(packets, version or 5)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([4, 5]),
    st.binary(max_size=200),
    st.lists(st.integers(min_value=0), max_size=4),
)
def test_arbitrary_bytes_after_a_valid_connect(version: int, data: bytes, cuts: list[int]) -> None:
    reader = MqttReader(max_packet_size=4096)
    connect = encode(Connect(version, "fuzz"), version)
    packets = drain(reader, connect + data, cuts)
    assert packets[:1] == [Connect(version, "fuzz")]
    check_canonical(packets, version)


@settings(max_examples=250, deadline=None)
@given(st.data(), st.sampled_from([4, 5]))
def test_single_byte_mutations_raise_only_mqtt_errors(data: st.DataObject, version: int) -> None:
    packet = data.draw(s.packets(version))
    wire = bytearray(encode(packet, version))
    index = data.draw(st.integers(0, len(wire) - 1))
    value = data.draw(st.integers(0, 255).filter(lambda b: b != wire[index]))
    wire[index] = value
    reader = MqttReader(max_packet_size=4096, version=version)
    check_canonical(drain(reader, bytes(wire)), version)


@settings(max_examples=150, deadline=None)
@given(st.data(), st.sampled_from([4, 5]))
def test_truncated_and_extended_packets(data: st.DataObject, version: int) -> None:
    packet = data.draw(s.packets(version))
    wire = encode(packet, version)
    cut = data.draw(st.integers(0, len(wire)))
    extra = data.draw(st.binary(max_size=8))
    reader = MqttReader(max_packet_size=4096, version=version)
    check_canonical(drain(reader, wire[:cut] + extra), version)
