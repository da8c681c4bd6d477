"""proto/coap_wire: CoAP messages on the wire, checked against aiocoap's own codec."""

from __future__ import annotations

from typing import Any

import pytest
from aiocoap import Message
from hypothesis import given
from hypothesis import strategies as st

from iotmesh.proto import coap_wire
from iotmesh.proto.coap_wire import ACK, CHANGED, CON, POST, MalformedMessage


def test_known_bytes() -> None:
    # CON POST, MID 0x1234, token "ab", Uri-Path "api" "v1", Content-Format 50, payload.
    data = bytes.fromhex("420212346162b36170690276311132ff") + b"{}"
    message = coap_wire.decode(data)
    assert message == coap_wire.Datagram(
        CON, POST, 0x1234, b"ab", [(11, b"api"), (11, b"v1"), (12, b"\x32")], b"{}"
    )
    assert coap_wire.encode(CON, POST, 0x1234, b"ab", message.options, b"{}") == data
    assert coap_wire.encode(ACK, CHANGED, 7, b"ab") == bytes.fromhex("624400076162")


@pytest.mark.parametrize(
    "data",
    [
        b"", b"\x42\x02\x00", b"\x82\x02\x00\x01", b"\x49\x02\x00\x01" + b"x" * 9,
        b"\x42\x02\x00\x01a", b"\x40\x02\x00\x01\xff", b"\x40\x02\x00\x01\xf0",
        b"\x40\x02\x00\x01\x0f", b"\x40\x02\x00\x01\xd0", b"\x40\x02\x00\x01\xe0\x01",
        b"\x40\x02\x00\x01\x03ab",
    ],
)  # fmt: skip
def test_malformed(data: bytes) -> None:
    with pytest.raises(MalformedMessage):
        coap_wire.decode(data)


options = st.lists(st.tuples(st.integers(0, 2000), st.binary(max_size=300)), max_size=6).map(
    lambda opts: sorted(opts, key=lambda o: o[0])
)


@given(
    st.integers(0, 3), st.integers(0, 255), st.integers(0, 0xFFFF), st.binary(max_size=8),
    options, st.binary(max_size=100),
)  # fmt: skip
def test_roundtrip(
    mtype: int, code: int, mid: int, token: bytes, opts: Any, payload: bytes
) -> None:
    data = coap_wire.encode(mtype, code, mid, token, opts, payload)
    assert coap_wire.decode(data) == coap_wire.Datagram(mtype, code, mid, token, opts, payload)


@given(st.binary(max_size=64))
def test_any_bytes_decode_or_raise(data: bytes) -> None:
    try:
        message = coap_wire.decode(data)
    except MalformedMessage:
        return
    assert coap_wire.encode(*message) == data


ascii_options = st.lists(
    st.tuples(st.integers(0, 2000), st.text("abc/=", max_size=300).map(str.encode)), max_size=6
).map(lambda opts: sorted(opts, key=lambda o: o[0]))


# ASCII values: aiocoap also refuses text options (Uri-Host, Uri-Path...) that are not UTF-8.
@given(st.integers(0, 0xFFFF), st.binary(max_size=8), ascii_options, st.binary(max_size=50))
def test_aiocoap_reads_what_we_write(mid: int, token: bytes, opts: Any, payload: bytes) -> None:
    opts = [(n, v) for n, v in opts if n not in (0, 128, 132, 136, 140)]  # reserved numbers
    theirs = Message.decode(coap_wire.encode(CON, POST, mid, token, opts, payload))
    assert theirs.mid == mid
    assert theirs.token == token
    assert theirs.payload == payload
    assert sorted(o.number for o in theirs.opt.option_list()) == [n for n, _ in opts]


def test_uint() -> None:
    assert coap_wire.uint(b"") == 0
    assert coap_wire.uint(b"\x01\x00") == 256
