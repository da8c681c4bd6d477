"""The MQTT data representations (spec 1.5): integers, variable byte integers, UTF-8
strings, binary data - read from and written to bytes.

Rules: every reader takes `(buf, pos, end)` and never looks at or past `end`, the end of
the packet being parsed, so a lying length field cannot make a packet borrow bytes from
the next one; each returns the position after the value. Readers raise `MalformedPacket`
and nothing else. Strings must be well-formed UTF-8 (Python's strict codec already refuses
surrogates, overlong forms and code points above U+10FFFF) and must not contain U+0000
(spec 1.5.4). Variable byte integers use at most 4 bytes and the fewest bytes possible
(spec 1.5.5). Writers validate what they are given and raise `EncodeError`.

Readers work on `bytes` and `bytearray` alike, so the reader can parse straight out of its
receive buffer without copying a packet first.
"""

from __future__ import annotations

from .errors import EncodeError, MalformedPacket

Buffer = bytes | bytearray

MAX_VARINT = 268_435_455
MAX_U16 = 0xFFFF
MAX_U32 = 0xFFFF_FFFF

# b"\x00" .. b"\x7f": one-byte varints and single bytes are built by lookup, not by call.
BYTES1 = [bytes((i,)) for i in range(256)]


def _short(what: str) -> MalformedPacket:
    return MalformedPacket(f"packet ends inside {what}")


def read_u8(buf: Buffer, pos: int, end: int) -> int:
    if pos >= end:
        raise _short("a byte field")
    return buf[pos]


def read_u16(buf: Buffer, pos: int, end: int) -> int:
    if pos + 2 > end:
        raise _short("a two byte integer")
    return (buf[pos] << 8) | buf[pos + 1]


def read_u32(buf: Buffer, pos: int, end: int) -> int:
    if pos + 4 > end:
        raise _short("a four byte integer")
    return int.from_bytes(buf[pos : pos + 4], "big")


def read_varint(buf: Buffer, pos: int, end: int) -> tuple[int, int]:
    """Read a variable byte integer; return (value, position after it)."""
    value = 0
    shift = 0
    for i in range(pos, min(pos + 4, end)):
        byte = buf[i]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            if byte == 0 and i > pos:
                raise MalformedPacket("variable byte integer not in its shortest form")
            return value, i + 1
        shift += 7
    if end - pos >= 4:
        raise MalformedPacket("variable byte integer longer than 4 bytes")
    raise _short("a variable byte integer")


def decode_utf8(raw: Buffer, what: str = "string") -> str:
    """Decode an MQTT UTF-8 string body: strict UTF-8 without U+0000."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedPacket(f"{what} is not well-formed UTF-8") from None
    if "\x00" in text:
        raise MalformedPacket(f"{what} contains U+0000")
    return text


def read_str(buf: Buffer, pos: int, end: int, what: str = "string") -> tuple[str, int]:
    if pos + 2 > end:
        raise _short(what)
    stop = pos + 2 + ((buf[pos] << 8) | buf[pos + 1])
    if stop > end:
        raise _short(what)
    return decode_utf8(buf[pos + 2 : stop], what), stop


def read_bin(buf: Buffer, pos: int, end: int, what: str = "binary data") -> tuple[bytes, int]:
    if pos + 2 > end:
        raise _short(what)
    stop = pos + 2 + ((buf[pos] << 8) | buf[pos + 1])
    if stop > end:
        raise _short(what)
    return bytes(buf[pos + 2 : stop]), stop


# -- writers -------------------------------------------------------------------------------


def varint(value: int) -> bytes:
    if 0 <= value < 0x80:
        return BYTES1[value]
    if not 0 <= value <= MAX_VARINT:
        raise EncodeError(f"{value} does not fit a variable byte integer")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def u8(value: int, what: str = "byte") -> bytes:
    if not isinstance(value, int) or not 0 <= value <= 0xFF:
        raise EncodeError(f"{what} {value!r} is out of range 0..255")
    return BYTES1[value]


def u16(value: int, what: str = "two byte integer") -> bytes:
    if not isinstance(value, int) or not 0 <= value <= MAX_U16:
        raise EncodeError(f"{what} {value!r} is out of range 0..65535")
    return value.to_bytes(2, "big")


def u32(value: int, what: str = "four byte integer") -> bytes:
    if not isinstance(value, int) or not 0 <= value <= MAX_U32:
        raise EncodeError(f"{what} {value!r} is out of range 0..4294967295")
    return value.to_bytes(4, "big")


def utf8(text: str, what: str = "string") -> bytes:
    """Encode an MQTT UTF-8 string body (without its length prefix)."""
    if not isinstance(text, str):
        raise EncodeError(f"{what} must be a str, not {type(text).__name__}")
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError:
        raise EncodeError(f"{what} contains a lone surrogate") from None
    if len(raw) > MAX_U16:
        raise EncodeError(f"{what} is {len(raw)} bytes, over 65535")
    if "\x00" in text:
        raise EncodeError(f"{what} contains U+0000")
    return raw


def string(text: str, what: str = "string") -> bytes:
    raw = utf8(text, what)
    return len(raw).to_bytes(2, "big") + raw


def binary(data: bytes, what: str = "binary data") -> bytes:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise EncodeError(f"{what} must be bytes, not {type(data).__name__}")
    if len(data) > MAX_U16:
        raise EncodeError(f"{what} is {len(data)} bytes, over 65535")
    return len(data).to_bytes(2, "big") + bytes(data)
