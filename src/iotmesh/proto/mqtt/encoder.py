"""`encode(packet, version) -> bytes`: one packet, as protocol level 4 (v3.1.1) or 5.

Rules:
- What v3.1.1 cannot say is left out, not refused: properties, reason codes of the
  PUBACK family, UNSUBACK and DISCONNECT. A v5 CONNACK reason becomes the nearest v3.1.1
  return code (`connack_code_311`) and a v5 SUBACK failure becomes 0x80. So the server
  decides in v5 terms and one call serves both kinds of client. AUTH has no v3.1.1 form
  and is refused.
- v5 short forms are used whenever allowed: PUBACK/PUBREC/PUBREL/PUBCOMP with reason 0
  and no properties are 2 bytes of body (with a reason and no properties, 3);
  DISCONNECT and AUTH with reason 0 and no properties have an empty body, and a
  DISCONNECT with a reason but no properties is that one byte (3.14.2.2.1; AUTH has no
  such form, so it keeps its property length).
- Everything the decoder would refuse, the encoder refuses too (`EncodeError`): we never
  send what we would not accept. That covers ranges (QoS, packet ids, keep alive), topic
  syntax, reason codes not listed for the packet type, and properties not allowed in it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import _wire as w
from .errors import EncodeError, InvalidTopic
from .packets import (
    Auth,
    Connack,
    Connect,
    Disconnect,
    Packet,
    Pingreq,
    Pingresp,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Suback,
    Subscribe,
    Unsuback,
    Unsubscribe,
)
from .properties import WILL, Properties, encode_properties
from .reason_codes import ALLOWED, connack_code_311
from .topics import SHARE_PREFIX, validate_topic_filter, validate_topic_name

_B = w.BYTES1


def encode(packet: Packet, version: int) -> bytes:
    """The wire form of `packet` for protocol level `version` (4 or 5).

    Raises:
        EncodeError: the packet breaks a rule of the spec, or `version` is not 4 or 5.
    """
    if version != 5 and version != 4:
        raise EncodeError(f"unsupported MQTT protocol level {version}")
    try:
        encoder = _ENCODERS[type(packet)]
    except KeyError:
        raise EncodeError(f"not an MQTT packet: {packet!r}") from None
    return encoder(packet, version == 5)


def _frame(first: int, body: bytes) -> bytes:
    return _B[first] + w.varint(len(body)) + body


def _packet_id(value: object) -> bytes:
    if type(value) is not int or not 0 < value <= 0xFFFF:
        raise EncodeError(f"packet identifier must be 1..65535, not {value!r}")
    return value.to_bytes(2, "big")


def _code(value: int, packet_type: int) -> int:
    if value not in ALLOWED[packet_type]:
        raise EncodeError(f"reason code {value!r} is not allowed in packet type {packet_type}")
    return int(value)


def _empty(props: Properties) -> bool:
    return not props._v or props.is_empty()


def _name(topic: str, what: str) -> bytes:
    try:
        validate_topic_name(topic)
    except InvalidTopic as exc:
        raise EncodeError(f"{what}: {exc}") from None
    return w.string(topic, what)


def _filter(topic_filter: str) -> bytes:
    try:
        validate_topic_filter(topic_filter)
    except InvalidTopic as exc:
        raise EncodeError(str(exc)) from None
    return w.string(topic_filter, "topic filter")


def _connect(p: Connect, v5: bool) -> bytes:
    if p.protocol_level != (5 if v5 else 4):
        raise EncodeError(f"CONNECT protocol level {p.protocol_level} encoded as another one")
    flags = 0x02 if p.clean_start else 0
    parts = [b"\x00\x04MQTT", _B[p.protocol_level], b"", w.u16(p.keep_alive, "keep alive")]
    if v5:
        parts.append(encode_properties(p.properties, 1))
    parts.append(w.string(p.client_id, "client identifier"))
    if p.will is not None:
        will = p.will
        if will.qos not in (0, 1, 2):
            raise EncodeError(f"will QoS {will.qos!r}")
        flags |= 0x04 | will.qos << 3 | (0x20 if will.retain else 0)
        if v5:
            parts.append(encode_properties(will.properties, WILL))
        parts.append(_name(will.topic, "will topic"))
        parts.append(w.binary(will.payload, "will payload"))
    if p.username is not None:
        flags |= 0x80
        parts.append(w.string(p.username, "user name"))
    if p.password is not None:
        if not v5 and p.username is None:
            raise EncodeError("v3.1.1 allows a password only with a user name")
        flags |= 0x40
        parts.append(w.binary(p.password, "password"))
    parts[2] = _B[flags]
    return _frame(0x10, b"".join(parts))


def _connack(p: Connack, v5: bool) -> bytes:
    code = _code(p.reason_code, 2)
    if p.session_present and code:
        raise EncodeError("session present on a refused connection")
    flags = _B[1 if p.session_present else 0]
    if not v5:
        return b"\x20\x02" + flags + _B[connack_code_311(code)]
    return _frame(0x20, flags + _B[code] + encode_properties(p.properties, 2))


def _publish(p: Publish, v5: bool) -> bytes:
    qos = p.qos
    topic = p.topic
    if ("+" in topic or "#" in topic or not topic) and (
        topic or not v5 or p.properties.topic_alias is None
    ):
        _name(topic, "topic name")  # raises with the precise reason
    raw = w.utf8(topic, "topic name")
    first = 0x30 | (0x01 if p.retain else 0)
    if qos:
        if qos != 1 and qos != 2:
            raise EncodeError(f"PUBLISH QoS {qos!r}")
        first |= qos << 1 | (0x08 if p.dup else 0)
        pid = _packet_id(p.packet_id)
    else:
        if p.packet_id is not None or p.dup:
            raise EncodeError("a QoS 0 PUBLISH has no packet identifier and no DUP flag")
        pid = b""
    props = encode_properties(p.properties, 3) if v5 else b""
    payload = p.payload
    if type(payload) is not bytes:
        if not isinstance(payload, bytearray | memoryview):
            raise EncodeError(f"payload must be bytes, not {type(payload).__name__}")
        payload = bytes(payload)
    length = 2 + len(raw) + len(pid) + len(props) + len(payload)
    return b"".join(
        (_B[first], w.varint(length), len(raw).to_bytes(2, "big"), raw, pid, props, payload)
    )


def _ack(p: Puback | Pubrec | Pubrel | Pubcomp, v5: bool, packet_type: int) -> bytes:
    pid = p.packet_id
    first = packet_type << 4 | (0x02 if packet_type == 6 else 0)
    if type(pid) is not int or not 0 < pid <= 0xFFFF:
        _packet_id(pid)
    code = p.reason_code
    if not v5:
        return bytes((first, 2, pid >> 8, pid & 0xFF))
    if _empty(p.properties):
        if code == 0:
            return bytes((first, 2, pid >> 8, pid & 0xFF))
        return bytes((first, 3, pid >> 8, pid & 0xFF, _code(code, packet_type)))
    body = _packet_id(pid) + _B[_code(code, packet_type)]
    return _frame(first, body + encode_properties(p.properties, packet_type))


def _subscribe(p: Subscribe, v5: bool) -> bytes:
    if not p.subscriptions:
        raise EncodeError("SUBSCRIBE needs at least one subscription")
    parts = [_packet_id(p.packet_id)]
    if v5:
        parts.append(encode_properties(p.properties, 8))
    for sub in p.subscriptions:
        if sub.qos not in (0, 1, 2) or sub.retain_handling not in (0, 1, 2):
            raise EncodeError(f"invalid subscription options {sub!r}")
        parts.append(_filter(sub.topic_filter))
        options = sub.qos
        if v5:
            if sub.no_local and sub.topic_filter.startswith(SHARE_PREFIX):
                raise EncodeError("No Local on a shared subscription")
            options |= (
                (0x04 if sub.no_local else 0)
                | (0x08 if sub.retain_as_published else 0)
                | sub.retain_handling << 4
            )
        parts.append(_B[options])
    return _frame(0x82, b"".join(parts))


def _suback(p: Suback, v5: bool) -> bytes:
    if not p.reason_codes:
        raise EncodeError("SUBACK needs at least one reason code")
    codes = [_code(code, 9) for code in p.reason_codes]
    if v5:
        head = _packet_id(p.packet_id) + encode_properties(p.properties, 9)
    else:
        head = _packet_id(p.packet_id)
        codes = [code if code < 0x80 else 0x80 for code in codes]
    return _frame(0x90, head + bytes(codes))


def _unsubscribe(p: Unsubscribe, v5: bool) -> bytes:
    if not p.topic_filters:
        raise EncodeError("UNSUBSCRIBE needs at least one topic filter")
    parts = [_packet_id(p.packet_id)]
    if v5:
        parts.append(encode_properties(p.properties, 10))
    parts.extend(_filter(topic_filter) for topic_filter in p.topic_filters)
    return _frame(0xA2, b"".join(parts))


def _unsuback(p: Unsuback, v5: bool) -> bytes:
    pid = _packet_id(p.packet_id)
    if not v5:
        return b"\xb0\x02" + pid
    if not p.reason_codes:
        raise EncodeError("a v5 UNSUBACK needs at least one reason code")
    codes = bytes(_code(code, 11) for code in p.reason_codes)
    return _frame(0xB0, pid + encode_properties(p.properties, 11) + codes)


def _disconnect(p: Disconnect, v5: bool) -> bytes:
    if not v5:
        return b"\xe0\x00"
    return _reason_and_props(0xE0, p.reason_code, p.properties, 14)


def _auth(p: Auth, v5: bool) -> bytes:
    if not v5:
        raise EncodeError("AUTH does not exist in MQTT 3.1.1")
    return _reason_and_props(0xF0, p.reason_code, p.properties, 15)


def _reason_and_props(first: int, code: int, props: Properties, packet_type: int) -> bytes:
    code = _code(code, packet_type)
    if _empty(props):
        if code == 0:
            return bytes((first, 0))
        if packet_type == 14:  # only DISCONNECT may drop the property length alone
            return bytes((first, 1, code))
    return _frame(first, _B[code] + encode_properties(props, packet_type))


_ENCODERS: dict[type[Any], Callable[[Any, bool], bytes]] = {
    Connect: _connect,
    Connack: _connack,
    Publish: _publish,
    Puback: lambda p, v5: _ack(p, v5, 4),
    Pubrec: lambda p, v5: _ack(p, v5, 5),
    Pubrel: lambda p, v5: _ack(p, v5, 6),
    Pubcomp: lambda p, v5: _ack(p, v5, 7),
    Subscribe: _subscribe,
    Suback: _suback,
    Unsubscribe: _unsubscribe,
    Unsuback: _unsuback,
    Pingreq: lambda p, v5: b"\xc0\x00",
    Pingresp: lambda p, v5: b"\xd0\x00",
    Disconnect: _disconnect,
    Auth: _auth,
}
