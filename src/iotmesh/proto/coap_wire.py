"""CoAP messages on the wire (RFC 7252 §3), sans-IO: bytes → `Datagram`, fields → bytes.

Only what the telemetry fast path needs (`transports/coap/fastpath.py`): every
request it does not take goes to aiocoap, which parses it again in full. The decoder
is as strict about the structure as aiocoap (a test checks aiocoap reads what
`encode` writes); it does not interpret option values:

    0                   1                   2                   3
    |Ver| T |  TKL  |      Code     |          Message ID           |
    | Token (0-8 bytes) ... | Options ... | 0xFF | Payload ...

Options are (delta, length) nibbles with 13 (one more byte, +13) and 14 (two more
bytes, +269) extensions; 15 is reserved except as the payload marker 0xFF, which must
be followed by at least one byte.
"""

from __future__ import annotations

from typing import NamedTuple

from iotmesh.core.errors import PayloadError

CON, NON, ACK, RST = 0, 1, 2, 3
EMPTY, POST = 0x00, 0x02
CHANGED, INTERNAL_SERVER_ERROR = 0x44, 0xA0

IF_MATCH, URI_HOST, OBSERVE, URI_PORT = 1, 3, 6, 7
URI_PATH, CONTENT_FORMAT, MAX_AGE, URI_QUERY, ACCEPT = 11, 12, 14, 15, 17
BLOCK2, BLOCK1, SIZE1 = 23, 27, 60


class MalformedMessage(PayloadError):
    """The datagram is not a well-formed CoAP message."""


class Datagram(NamedTuple):
    """One decoded CoAP message; `options` in wire order as (number, value)."""

    mtype: int
    code: int
    mid: int
    token: bytes
    options: list[tuple[int, bytes]]
    payload: bytes


def _extended(nibble: int, data: bytes, pos: int) -> tuple[int, int]:
    if nibble < 13:
        return nibble, pos
    if nibble == 13:
        if pos >= len(data):
            raise MalformedMessage("option: truncated extended field")
        return data[pos] + 13, pos + 1
    if nibble == 14:
        if pos + 2 > len(data):
            raise MalformedMessage("option: truncated extended field")
        return int.from_bytes(data[pos : pos + 2], "big") + 269, pos + 2
    raise MalformedMessage("option: reserved nibble 15")


def decode(data: bytes) -> Datagram:
    """Decode one datagram.

    Raises:
        MalformedMessage: not CoAP version 1, or a field runs past the end.
    """
    if len(data) < 4:
        raise MalformedMessage("shorter than the 4-byte header")
    first = data[0]
    if first >> 6 != 1:
        raise MalformedMessage("not CoAP version 1")
    tkl = first & 0x0F
    if tkl > 8:
        raise MalformedMessage("token length over 8")
    pos = 4 + tkl
    if pos > len(data):
        raise MalformedMessage("truncated token")
    options: list[tuple[int, bytes]] = []
    number = 0
    payload = b""
    while pos < len(data):
        byte = data[pos]
        pos += 1
        if byte == 0xFF:
            payload = data[pos:]
            if not payload:
                raise MalformedMessage("payload marker without a payload")
            break
        delta, pos = _extended(byte >> 4, data, pos)
        length, pos = _extended(byte & 0x0F, data, pos)
        if pos + length > len(data):
            raise MalformedMessage("option value runs past the end")
        number += delta
        options.append((number, data[pos : pos + length]))
        pos += length
    return Datagram((first >> 4) & 3, data[1], int.from_bytes(data[2:4], "big"),
                    data[4 : 4 + tkl], options, payload)  # fmt: skip


def _nibble(value: int) -> tuple[int, bytes]:
    if value < 13:
        return value, b""
    if value < 269:
        return 13, bytes([value - 13])
    return 14, (value - 269).to_bytes(2, "big")


def encode(
    mtype: int,
    code: int,
    mid: int,
    token: bytes,
    options: list[tuple[int, bytes]] | None = None,
    payload: bytes = b"",
) -> bytes:
    """Encode one message; `options` sorted by number."""
    out = bytearray((0x40 | (mtype << 4) | len(token), code))
    out += mid.to_bytes(2, "big")
    out += token
    number = 0
    for option, value in options or ():
        delta, delta_ext = _nibble(option - number)
        length, length_ext = _nibble(len(value))
        out.append((delta << 4) | length)
        out += delta_ext + length_ext + value
        number = option
    if payload:
        out.append(0xFF)
        out += payload
    return bytes(out)


def uint(value: bytes) -> int:
    """An option's unsigned integer value (network byte order, leading zeros dropped)."""
    return int.from_bytes(value, "big")
