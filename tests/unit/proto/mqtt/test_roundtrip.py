"""Property tests: encode -> decode is the identity, however the bytes are split."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from iotmesh.proto.mqtt import MqttReader, Packet, Pingreq, Publish, encode

from . import strategies as s

VERSIONS = st.sampled_from([4, 5])


def read_all(chunks: list[bytes], reader: MqttReader, one_by_one: bool) -> list[Packet]:
    out: list[Packet] = []
    for chunk in chunks:
        reader.feed(chunk)
        if one_by_one:
            out.extend(reader)
        else:
            while packets := reader.read_packets():
                out.extend(packets)
    assert reader.read_packets() == []  # no error waiting behind the last packet
    return out


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=250, deadline=None)
@given(st.data())
def test_every_packet_round_trips(data: st.DataObject) -> None:
    version = data.draw(VERSIONS)
    packet = data.draw(s.packets(version))
    wire = encode(packet, version)
    reader = MqttReader(version=version)
    reader.feed(wire)
    assert reader.next_packet() == packet
    assert reader.next_packet() is None
    assert reader.buffered == 0
    # encoding is deterministic and canonical: the decoded packet encodes the same
    assert encode(packet, version) == wire


@settings(max_examples=100, deadline=None)
@given(
    st.data(),
    st.lists(st.integers(min_value=0), max_size=12),
    st.booleans(),
)
def test_a_stream_split_anywhere_decodes_the_same(
    data: st.DataObject, cuts: list[int], one_by_one: bool
) -> None:
    version = data.draw(VERSIONS)
    packets = data.draw(st.lists(s.packets(version), min_size=1, max_size=8))
    stream = b"".join(encode(p, version) for p in packets)
    reader = MqttReader(version=version)
    assert read_all(split(stream, cuts), reader, one_by_one) == packets
    assert reader.buffered == 0


@settings(max_examples=50, deadline=None)
@given(st.data(), st.lists(st.integers(min_value=0), max_size=12))
def test_server_side_takes_the_version_from_connect(data: st.DataObject, cuts: list[int]) -> None:
    version = data.draw(VERSIONS)
    connect = data.draw(s.connects(version))
    rest = data.draw(st.lists(s.client_packets(version), max_size=6))
    stream = b"".join(encode(p, version) for p in [connect, *rest])
    reader = MqttReader(max_packet_size=1 << 16)
    assert reader.version is None
    assert read_all(split(stream, cuts), reader, one_by_one=False) == [connect, *rest]
    assert reader.version == version


def test_a_large_packet_trickling_in_decodes_once_complete() -> None:
    packet = Publish("t/big", bytes(range(256)) * 400, 1, False, False, 9)
    stream = encode(packet, 4) + encode(Pingreq(), 4)
    reader = MqttReader(max_packet_size=1 << 20, version=4)
    got: list[Packet] = []
    for i in range(0, len(stream), 7):
        reader.feed(stream[i : i + 7])
        got.extend(reader.read_packets())
        assert reader.buffered < 110_000
    assert got == [packet, Pingreq()]
    assert reader.buffered == 0


def test_feed_accepts_bytearray_and_memoryview() -> None:
    wire = encode(Publish("a", b"xyz"), 5)
    reader = MqttReader(version=5)
    buffer = bytearray(wire[:3])
    reader.feed(buffer)
    buffer[:] = b"\xff\xff\xff"  # the caller reuses its buffer: the reader kept a copy
    reader.feed(memoryview(wire)[3:])
    assert reader.read_packets() == [Publish("a", b"xyz")]
