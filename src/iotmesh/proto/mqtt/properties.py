"""MQTT 5 properties (spec 2.2.2): the table of every property, and `Properties`.

Rules, all from the spec, enforced on decode and on encode:
- Each property is allowed only in the packet types the table lists (Will Properties count
  as their own place, `WILL`); elsewhere the packet is malformed (2.2.2.2).
- A property may appear once, except User Property (any number, order kept) and
  Subscription Identifier, which repeats only in PUBLISH (the server sends one per
  matching subscription); a second copy anywhere else is a protocol error.
- Values outside their meaning are protocol errors: the 0/1 flags and Maximum QoS may
  only be 0 or 1; Receive Maximum, Maximum Packet Size and Topic Alias may not be 0; a
  Subscription Identifier is 1..268,435,455.

Why a dict inside: most packets carry no properties, so an empty `Properties` must cost
one small allocation, and "is it empty?" must be one test - the encoder's short forms
(2-byte PUBACK, 0-byte DISCONNECT) depend on it on every acknowledgement. The attributes
(`props.topic_alias`, ...) are typed descriptors over that dict: unset reads as None (or
an empty list for the two repeatable ones).
"""

from __future__ import annotations

from typing import Any, Generic, NamedTuple, TypedDict, TypeVar, Unpack, cast, overload

from . import _wire as w
from .errors import EncodeError, MalformedPacket, ProtocolError

T = TypeVar("T")

# Where a property may appear: the packet type numbers, plus WILL for Will Properties
# (packet type 0 is reserved, so it cannot clash).
WILL = 0
CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, DISCONNECT, AUTH = 8, 9, 10, 11, 14, 15

# Wire types (spec 2.2.2.2).
BYTE, U16, U32, VARINT, STR, BIN, PAIR = "byte", "u16", "u32", "varint", "str", "bin", "pair"


class PropertyDef(NamedTuple):
    id: int
    name: str
    kind: str
    places: frozenset[int]
    lo: int = 0
    hi: int = w.MAX_U32
    repeatable: bool = False


def _p(
    id: int, name: str, kind: str, places: set[int], lo: int = 0, hi: int | None = None
) -> PropertyDef:
    top = {BYTE: 0xFF, U16: w.MAX_U16, U32: w.MAX_U32, VARINT: w.MAX_VARINT}.get(kind, 0)
    rep = id in (0x0B, 0x26)
    return PropertyDef(id, name, kind, frozenset(places), lo, top if hi is None else hi, rep)


_ACKS = {PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK, UNSUBACK}
_APP = {PUBLISH, WILL}
PROPERTY_DEFS: tuple[PropertyDef, ...] = (
    _p(0x01, "payload_format_indicator", BYTE, _APP, hi=1),
    _p(0x02, "message_expiry_interval", U32, _APP),
    _p(0x03, "content_type", STR, _APP),
    _p(0x08, "response_topic", STR, _APP),
    _p(0x09, "correlation_data", BIN, _APP),
    _p(0x0B, "subscription_identifiers", VARINT, {PUBLISH, SUBSCRIBE}, lo=1),
    _p(0x11, "session_expiry_interval", U32, {CONNECT, CONNACK, DISCONNECT}),
    _p(0x12, "assigned_client_identifier", STR, {CONNACK}),
    _p(0x13, "server_keep_alive", U16, {CONNACK}),
    _p(0x15, "authentication_method", STR, {CONNECT, CONNACK, AUTH}),
    _p(0x16, "authentication_data", BIN, {CONNECT, CONNACK, AUTH}),
    _p(0x17, "request_problem_information", BYTE, {CONNECT}, hi=1),
    _p(0x18, "will_delay_interval", U32, {WILL}),
    _p(0x19, "request_response_information", BYTE, {CONNECT}, hi=1),
    _p(0x1A, "response_information", STR, {CONNACK}),
    _p(0x1C, "server_reference", STR, {CONNACK, DISCONNECT}),
    _p(0x1F, "reason_string", STR, {CONNACK, DISCONNECT, AUTH, *_ACKS}),
    _p(0x21, "receive_maximum", U16, {CONNECT, CONNACK}, lo=1),
    _p(0x22, "topic_alias_maximum", U16, {CONNECT, CONNACK}),
    _p(0x23, "topic_alias", U16, {PUBLISH}, lo=1),
    _p(0x24, "maximum_qos", BYTE, {CONNACK}, hi=1),
    _p(0x25, "retain_available", BYTE, {CONNACK}, hi=1),
    _p(
        0x26,
        "user_properties",
        PAIR,
        {CONNECT, CONNACK, PUBLISH, WILL, SUBSCRIBE, *_ACKS} | {UNSUBSCRIBE, DISCONNECT, AUTH},
    ),
    _p(0x27, "maximum_packet_size", U32, {CONNECT, CONNACK}, lo=1),
    _p(0x28, "wildcard_subscription_available", BYTE, {CONNACK}, hi=1),
    _p(0x29, "subscription_identifier_available", BYTE, {CONNACK}, hi=1),
    _p(0x2A, "shared_subscription_available", BYTE, {CONNACK}, hi=1),
)
BY_ID: dict[int, PropertyDef] = {d.id: d for d in PROPERTY_DEFS}
BY_NAME: dict[str, PropertyDef] = {d.name: d for d in PROPERTY_DEFS}
_BY_BYTE: list[PropertyDef | None] = [BY_ID.get(i) for i in range(256)]


class PropertyValues(TypedDict, total=False):
    """Keyword arguments of `Properties(...)`: one per property."""

    payload_format_indicator: int
    message_expiry_interval: int
    content_type: str
    response_topic: str
    correlation_data: bytes
    subscription_identifiers: list[int]
    session_expiry_interval: int
    assigned_client_identifier: str
    server_keep_alive: int
    authentication_method: str
    authentication_data: bytes
    request_problem_information: int
    will_delay_interval: int
    request_response_information: int
    response_information: str
    server_reference: str
    reason_string: str
    receive_maximum: int
    topic_alias_maximum: int
    topic_alias: int
    maximum_qos: int
    retain_available: int
    user_properties: list[tuple[str, str]]
    maximum_packet_size: int
    wildcard_subscription_available: int
    subscription_identifier_available: int
    shared_subscription_available: int


class _Field(Generic[T]):
    """One single-valued property: reads None when unset; assigning None unsets it."""

    __slots__ = ("id",)

    def __init__(self, name: str) -> None:
        self.id = BY_NAME[name].id

    @overload
    def __get__(self, obj: None, owner: type[Any]) -> _Field[T]: ...
    @overload
    def __get__(self, obj: Properties, owner: type[Any]) -> T | None: ...
    def __get__(self, obj: Properties | None, owner: type[Any]) -> _Field[T] | T | None:
        if obj is None:
            return self
        return cast("T | None", obj._v.get(self.id))

    def __set__(self, obj: Properties, value: T | None) -> None:
        if value is None:
            obj._v.pop(self.id, None)
        else:
            obj._v[self.id] = value


class _ListField(Generic[T]):
    """A repeatable property: reads as a list you may append to; [] when unset."""

    __slots__ = ("id",)

    def __init__(self, name: str) -> None:
        self.id = BY_NAME[name].id

    @overload
    def __get__(self, obj: None, owner: type[Any]) -> _ListField[T]: ...
    @overload
    def __get__(self, obj: Properties, owner: type[Any]) -> list[T]: ...
    def __get__(self, obj: Properties | None, owner: type[Any]) -> _ListField[T] | list[T]:
        if obj is None:
            return self
        value = obj._v.get(self.id)
        if value is None:
            value = obj._v[self.id] = []
        return cast("list[T]", value)

    def __set__(self, obj: Properties, value: list[T]) -> None:
        obj._v[self.id] = list(value)


class Properties:
    """The properties of one MQTT 5 packet (or of a will message).

    `Properties(topic_alias=3, user_properties=[("k", "v")])`; unset ones read as None.
    Equality ignores the order of different properties, not of repeated ones.
    """

    __slots__ = ("_v",)

    payload_format_indicator = _Field[int]("payload_format_indicator")
    message_expiry_interval = _Field[int]("message_expiry_interval")
    content_type = _Field[str]("content_type")
    response_topic = _Field[str]("response_topic")
    correlation_data = _Field[bytes]("correlation_data")
    subscription_identifiers = _ListField[int]("subscription_identifiers")
    session_expiry_interval = _Field[int]("session_expiry_interval")
    assigned_client_identifier = _Field[str]("assigned_client_identifier")
    server_keep_alive = _Field[int]("server_keep_alive")
    authentication_method = _Field[str]("authentication_method")
    authentication_data = _Field[bytes]("authentication_data")
    request_problem_information = _Field[int]("request_problem_information")
    will_delay_interval = _Field[int]("will_delay_interval")
    request_response_information = _Field[int]("request_response_information")
    response_information = _Field[str]("response_information")
    server_reference = _Field[str]("server_reference")
    reason_string = _Field[str]("reason_string")
    receive_maximum = _Field[int]("receive_maximum")
    topic_alias_maximum = _Field[int]("topic_alias_maximum")
    topic_alias = _Field[int]("topic_alias")
    maximum_qos = _Field[int]("maximum_qos")
    retain_available = _Field[int]("retain_available")
    user_properties = _ListField[tuple[str, str]]("user_properties")
    maximum_packet_size = _Field[int]("maximum_packet_size")
    wildcard_subscription_available = _Field[int]("wildcard_subscription_available")
    subscription_identifier_available = _Field[int]("subscription_identifier_available")
    shared_subscription_available = _Field[int]("shared_subscription_available")

    def __init__(self, **values: Unpack[PropertyValues]) -> None:
        self._v: dict[int, Any] = {}
        for name, value in values.items():
            setattr(self, name, value)

    def is_empty(self) -> bool:
        """True when nothing would be encoded (no value set, repeatable lists empty)."""
        v = self._v
        return not v or all(type(x) is list and not x for x in v.values())

    def _items(self) -> dict[int, Any]:
        return {k: x for k, x in self._v.items() if not (type(x) is list and not x)}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Properties):
            return NotImplemented
        return self._items() == other._items()

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        inner = ", ".join(f"{BY_ID[k].name}={x!r}" for k, x in sorted(self._items().items()))
        return f"Properties({inner})"


# -- wire ----------------------------------------------------------------------------------

_new = Properties.__new__


def decode_properties(buf: w.Buffer, pos: int, end: int, place: int) -> tuple[Properties, int]:
    """Read a property length and the properties after it, allowed in `place`.

    Returns the properties and the position after them.
    """
    if pos < end and buf[pos] < 0x80:
        length = buf[pos]
        pos += 1
    else:
        length, pos = w.read_varint(buf, pos, end)
    props = _new(Properties)
    v: dict[int, Any] = {}
    props._v = v
    if length == 0:
        return props, pos
    stop = pos + length
    if stop > end:
        raise MalformedPacket("property length runs past the end of the packet")
    while pos < stop:
        pid = buf[pos]  # every identifier is < 0x80: a one-byte variable byte integer
        d = _BY_BYTE[pid]
        if d is None:
            raise MalformedPacket(f"unknown property identifier 0x{pid:02X}")
        if place not in d.places:
            raise MalformedPacket(f"property {d.name} is not allowed in {_place_name(place)}")
        pos += 1
        kind = d.kind
        value: Any
        if kind is STR or kind is BIN or kind is PAIR:
            if pos + 2 > stop:
                raise MalformedPacket(f"packet ends inside property {d.name}")
            nxt = pos + 2 + ((buf[pos] << 8) | buf[pos + 1])
            if nxt > stop:
                raise MalformedPacket(f"packet ends inside property {d.name}")
            if kind is BIN:
                value = bytes(buf[pos + 2 : nxt])
            else:
                value = w.decode_utf8(buf[pos + 2 : nxt], d.name)
                if kind is PAIR:
                    second, nxt = w.read_str(buf, nxt, stop, "user property value")
                    value = (value, second)
            pos = nxt
        else:
            if kind is BYTE:
                size = 1
            elif kind is U16:
                size = 2
            elif kind is U32:
                size = 4
            else:
                value, pos = w.read_varint(buf, pos, stop)
                size = 0
            if size:
                if pos + size > stop:
                    raise MalformedPacket(f"packet ends inside property {d.name}")
                value = int.from_bytes(buf[pos : pos + size], "big") if size > 1 else buf[pos]
                pos += size
            if not d.lo <= value <= d.hi:
                raise ProtocolError(f"property {d.name} has the invalid value {value}")
        if d.repeatable:
            seen = v.get(pid)
            if seen is None:
                v[pid] = [value]
            elif pid == 0x0B and place != PUBLISH:
                raise ProtocolError(f"property {d.name} appears twice in {_place_name(place)}")
            else:
                seen.append(value)
        elif pid in v:
            raise ProtocolError(f"property {d.name} appears twice")
        else:
            v[pid] = value
    return props, stop


def encode_properties(props: Properties, place: int) -> bytes:
    """The property length and properties, as the wire carries them in `place`."""
    if not props._v:
        return b"\x00"
    parts: list[bytes] = []
    for pid, value in props._v.items():
        d = BY_ID[pid]
        if d.repeatable:
            if not value:
                continue
            if pid == 0x0B and place != PUBLISH and len(value) > 1:
                raise EncodeError(f"{d.name} may hold one value in {_place_name(place)}")
            items = value
        else:
            items = (value,)
        if place not in d.places:
            raise EncodeError(f"property {d.name} is not allowed in {_place_name(place)}")
        for item in items:
            parts.append(w.BYTES1[pid])
            parts.append(_encode_value(d, item))
    body = b"".join(parts)
    return w.varint(len(body)) + body


def _encode_value(d: PropertyDef, value: Any) -> bytes:
    kind = d.kind
    if kind is STR:
        return w.string(value, d.name)
    if kind is BIN:
        return w.binary(value, d.name)
    if kind is PAIR:
        if not (isinstance(value, tuple) and len(value) == 2):
            raise EncodeError(f"a user property must be a (name, value) pair, not {value!r}")
        return w.string(value[0], "user property name") + w.string(value[1], "user property")
    if not isinstance(value, int) or not d.lo <= value <= d.hi:
        raise EncodeError(f"property {d.name} cannot be {value!r} (range {d.lo}..{d.hi})")
    if kind is BYTE:
        return w.BYTES1[value]
    if kind is U16:
        return value.to_bytes(2, "big")
    if kind is U32:
        return value.to_bytes(4, "big")
    return w.varint(value)


_PLACE_NAMES = {
    WILL: "Will Properties",
    **{
        n: name
        for name, n in (
            ("CONNECT", 1),
            ("CONNACK", 2),
            ("PUBLISH", 3),
            ("PUBACK", 4),
            ("PUBREC", 5),
            ("PUBREL", 6),
            ("PUBCOMP", 7),
            ("SUBSCRIBE", 8),
            ("SUBACK", 9),
            ("UNSUBSCRIBE", 10),
            ("UNSUBACK", 11),
            ("PINGREQ", 12),
            ("PINGRESP", 13),
            ("DISCONNECT", 14),
            ("AUTH", 15),
        )
    },
}


def _place_name(place: int) -> str:
    return _PLACE_NAMES.get(place, f"packet type {place}")
