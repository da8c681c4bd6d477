"""The reader at the caller's pace: `next_packet` takes one packet and leaves the rest
buffered, unparsed, in order, whatever is fed meanwhile.

The MQTT server relies on this to stop handling a client's packets in the middle of a
socket read (its Receive Maximum reached) and to go on later where it stopped.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iotmesh.proto.mqtt import (
    Connect,
    MalformedPacket,
    MqttReader,
    Packet,
    Pingreq,
    Properties,
    Puback,
    Publish,
    encode,
)

from . import strategies as s

TOPIC = "v1/devices/me/telemetry"


def publish(n: int, version: int = 4) -> Publish:
    props = Properties(user_properties=[("n", str(n))]) if version == 5 else Properties()
    return Publish(TOPIC, b'{"seq":%d}' % n, 1, False, False, n + 1, props)


def wire(packets: list[Packet], version: int) -> bytes:
    return b"".join(encode(p, version) for p in packets)


@pytest.mark.parametrize("version", [4, 5])
def test_next_packet_takes_one_and_leaves_the_rest_as_bytes(version: int) -> None:
    packets: list[Packet] = [publish(n, version) for n in range(100)]
    reader = MqttReader(version=version)
    reader.feed(wire(packets, version))

    assert reader.next_packet() == packets[0]
    assert reader.buffered == len(wire(packets[1:], version))
    taken = [reader.next_packet() for _ in range(63)]
    assert taken == packets[1:64]
    assert reader.buffered == len(wire(packets[64:], version))
    assert reader.read_packets() == packets[64:]
    assert reader.buffered == 0
    assert reader.next_packet() is None


def test_bytes_after_the_packet_taken_are_not_even_checked() -> None:
    good = wire([publish(n) for n in range(3)], 4)
    reader = MqttReader(version=4)
    reader.feed(good + b"\x00\x00")  # then a reserved packet type: malformed

    assert reader.next_packet() == publish(0)
    assert reader.next_packet() == publish(1)
    assert reader.next_packet() == publish(2)  # fine so far: the bad bytes wait
    with pytest.raises(MalformedPacket):
        reader.next_packet()
    with pytest.raises(MalformedPacket):  # and errors stay final
        reader.next_packet()


def test_bytes_fed_while_packets_wait_come_after_them() -> None:
    reader = MqttReader(version=4)
    reader.feed(wire([publish(0), publish(1), publish(2)], 4))
    assert reader.next_packet() == publish(0)
    later = wire([Puback(7), Pingreq(), publish(3)], 4)
    reader.feed(later[:5])  # a read ending inside a packet
    reader.feed(later[5:])

    assert [reader.next_packet() for _ in range(5)] == [
        publish(1),
        publish(2),
        Puback(7),
        Pingreq(),
        publish(3),
    ]
    assert reader.next_packet() is None


def test_a_packet_cut_at_the_end_of_the_buffer_waits_for_its_rest() -> None:
    data = wire([publish(0), publish(1)], 4)
    reader = MqttReader(version=4)
    reader.feed(data[:-3])
    assert reader.next_packet() == publish(0)
    assert reader.next_packet() is None
    assert reader.buffered == len(encode(publish(1), 4)) - 3
    reader.feed(data[-3:])
    assert reader.next_packet() == publish(1)


def test_server_side_connect_sets_the_version_for_the_packets_left_behind() -> None:
    connect = Connect(protocol_level=5, client_id="c1")
    later = [publish(n, 5) for n in range(3)]  # v5 properties: parsed as v5 or not at all
    reader = MqttReader()
    reader.feed(encode(connect, 5) + wire(later, 5))

    assert reader.next_packet() == connect
    assert reader.version == 5
    assert reader.buffered == len(wire(later, 5))
    assert reader.read_packets() == later


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from([4, 5]),
    st.data(),
    st.lists(st.integers(min_value=0), max_size=6),
    st.lists(st.integers(0, 4), min_size=1, max_size=20),
)
def test_any_pace_gives_the_same_packets_in_the_same_order(
    version: int, data: st.DataObject, cuts: list[int], steps: list[int]
) -> None:
    """Feeding in pieces and taking 0..4 packets between feeds yields what one
    `read_packets` of everything yields."""
    packets = data.draw(st.lists(s.client_packets(version), max_size=12))
    stream = wire(packets, version)
    points = sorted({c % (len(stream) + 1) for c in cuts})
    pieces = [stream[a:b] for a, b in itertools.pairwise([0, *points, len(stream)])]

    reader = MqttReader(version=version)
    got: list[Packet] = []
    for piece, take in zip(pieces, itertools.cycle(steps), strict=False):
        reader.feed(piece)
        for _ in range(take):
            packet = reader.next_packet()
            if packet is None:
                break
            got.append(packet)
    while (packet := reader.next_packet()) is not None:
        got.append(packet)

    assert got == packets
    assert reader.buffered == 0
