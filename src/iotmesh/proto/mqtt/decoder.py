"""Parsers for the body of each MQTT packet type, v3.1.1 and v5.

Each parser gets the receive buffer and `[pos, end)`, the packet's variable header and
payload, already cut out by the fixed header's Remaining Length; it must consume exactly
that span (trailing bytes are malformed). The reader validated the fixed-header flags.

Rules beyond the grammar, and why they are errors rather than things to tolerate:
- Packet identifiers are 1..65535 where present (0 would collide with "none").
- CONNECT: the reserved flag is 0; will QoS/retain only with the will flag; will QoS 3
  is malformed; v3.1.1 forbids a password without a user name (v5 allows it). A protocol
  level other than 4 or 5 (or the v3.1 name "MQIsdp") raises
  `UnsupportedProtocolVersion`, so the server can still answer with a CONNACK.
- CONNACK: session present must be 0 when the connection is refused.
- SUBSCRIBE/UNSUBSCRIBE must list at least one filter; reserved option bits are 0;
  retain handling 3 and QoS 3 are refused; No Local on a shared subscription is a
  protocol error (v5 3.8.3.1).
- Reason codes must be among those the spec lists for the packet type.
The PUBLISH parser lives in the reader: it is the hot path.
"""

from __future__ import annotations

from collections.abc import Callable

from . import _wire as w
from .errors import InvalidTopic, MalformedPacket, ProtocolError, UnsupportedProtocolVersion
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
    Pubrec,
    Pubrel,
    Suback,
    Subscribe,
    Subscription,
    Unsuback,
    Unsubscribe,
    Will,
)
from .properties import WILL, Properties, decode_properties
from .reason_codes import ALLOWED, SUBACK_311, ReasonCode, reason_from_311
from .topics import SHARE_PREFIX, validate_topic_filter, validate_topic_name

Parser = Callable[[w.Buffer, int, int, bool], Packet]

_CODES = {code.value: code for code in ReasonCode}


def reason(value: int, packet_type: int) -> ReasonCode:
    """The byte as a ReasonCode, if the spec allows it in this packet type."""
    if value not in ALLOWED[packet_type]:
        raise MalformedPacket(f"reason code 0x{value:02X} is not allowed here")
    return _CODES[value]


def packet_id(buf: w.Buffer, pos: int, end: int) -> int:
    value = w.read_u16(buf, pos, end)
    if value == 0:
        raise MalformedPacket("packet identifier 0")
    return value


def _done(pos: int, end: int) -> None:
    if pos != end:
        raise MalformedPacket(f"{end - pos} unexpected bytes at the end of the packet")


def _filter(buf: w.Buffer, pos: int, end: int) -> tuple[str, int]:
    text, pos = w.read_str(buf, pos, end, "topic filter")
    try:
        validate_topic_filter(text)
    except InvalidTopic as exc:
        raise MalformedPacket(str(exc)) from None
    return text, pos


def parse_connect(buf: w.Buffer, pos: int, end: int, v5: bool) -> Connect:
    name, pos = w.read_str(buf, pos, end, "protocol name")
    level = w.read_u8(buf, pos, end)
    if name != "MQTT":
        if name == "MQIsdp":
            raise UnsupportedProtocolVersion(level, name)
        raise MalformedPacket(f"unknown protocol name {name!r}")
    if level != 4 and level != 5:
        raise UnsupportedProtocolVersion(level)
    v5 = level == 5
    flags = w.read_u8(buf, pos + 1, end)
    if flags & 0x01:
        raise MalformedPacket("CONNECT reserved flag is set")
    will_flag = flags & 0x04
    will_qos = (flags >> 3) & 0x03
    will_retain = bool(flags & 0x20)
    if will_qos == 3:
        raise MalformedPacket("will QoS 3")
    if not will_flag and (will_qos or will_retain):
        raise MalformedPacket("will QoS or retain set without the will flag")
    if not v5 and flags & 0x40 and not flags & 0x80:
        raise MalformedPacket("password flag without user name flag (v3.1.1)")
    keep_alive = w.read_u16(buf, pos + 2, end)
    pos += 4
    props = Properties()
    if v5:
        props, pos = decode_properties(buf, pos, end, 1)
    client_id, pos = w.read_str(buf, pos, end, "client identifier")
    will = None
    if will_flag:
        will_props = Properties()
        if v5:
            will_props, pos = decode_properties(buf, pos, end, WILL)
        topic, pos = w.read_str(buf, pos, end, "will topic")
        try:
            validate_topic_name(topic)
        except InvalidTopic as exc:
            raise MalformedPacket(str(exc)) from None
        payload, pos = w.read_bin(buf, pos, end, "will payload")
        will = Will(topic, payload, will_qos, will_retain, will_props)
    username = password = None
    if flags & 0x80:
        username, pos = w.read_str(buf, pos, end, "user name")
    if flags & 0x40:
        password, pos = w.read_bin(buf, pos, end, "password")
    _done(pos, end)
    return Connect(
        level, client_id, bool(flags & 0x02), keep_alive, username, password, will, props
    )


def parse_connack(buf: w.Buffer, pos: int, end: int, v5: bool) -> Connack:
    flags = w.read_u8(buf, pos, end)
    if flags & 0xFE:
        raise MalformedPacket("CONNACK reserved flags are set")
    value = w.read_u8(buf, pos + 1, end)
    props = Properties()
    if v5:
        code = reason(value, 2)
        props, pos = decode_properties(buf, pos + 2, end, 2)
    else:
        if value > 5:
            raise MalformedPacket(f"CONNACK return code {value} is reserved")
        code = reason_from_311(value)
        pos += 2
    _done(pos, end)
    if flags and code:
        raise ProtocolError("session present set on a refused connection")
    return Connack(bool(flags), code, props)


def _ack(
    buf: w.Buffer, pos: int, end: int, v5: bool, packet_type: int
) -> tuple[int, ReasonCode, Properties]:
    """PUBACK/PUBREC/PUBREL/PUBCOMP: v5 may omit the properties, then the reason code."""
    pid = packet_id(buf, pos, end)
    if not v5 or end - pos == 2:
        _done(pos + 2, end)
        return pid, ReasonCode.SUCCESS, Properties()
    code = reason(buf[pos + 2], packet_type)
    if end - pos == 3:
        return pid, code, Properties()
    props, pos = decode_properties(buf, pos + 3, end, packet_type)
    _done(pos, end)
    return pid, code, props


def parse_puback(buf: w.Buffer, pos: int, end: int, v5: bool) -> Puback:
    return Puback(*_ack(buf, pos, end, v5, 4))


def parse_pubrec(buf: w.Buffer, pos: int, end: int, v5: bool) -> Pubrec:
    return Pubrec(*_ack(buf, pos, end, v5, 5))


def parse_pubrel(buf: w.Buffer, pos: int, end: int, v5: bool) -> Pubrel:
    return Pubrel(*_ack(buf, pos, end, v5, 6))


def parse_pubcomp(buf: w.Buffer, pos: int, end: int, v5: bool) -> Pubcomp:
    return Pubcomp(*_ack(buf, pos, end, v5, 7))


def parse_subscribe(buf: w.Buffer, pos: int, end: int, v5: bool) -> Subscribe:
    pid = packet_id(buf, pos, end)
    pos += 2
    props = Properties()
    if v5:
        props, pos = decode_properties(buf, pos, end, 8)
    subs: list[Subscription] = []
    while pos < end:
        topic_filter, pos = _filter(buf, pos, end)
        options = w.read_u8(buf, pos, end)
        pos += 1
        qos = options & 0x03
        if v5:
            if options & 0xC0:
                raise MalformedPacket("reserved subscription option bits are set")
            if qos == 3:
                raise ProtocolError("subscription QoS 3")
            retain_handling = (options >> 4) & 0x03
            if retain_handling == 3:
                raise ProtocolError("retain handling 3")
            no_local = bool(options & 0x04)
            if no_local and topic_filter.startswith(SHARE_PREFIX):
                raise ProtocolError("No Local on a shared subscription")
            subs.append(
                Subscription(topic_filter, qos, no_local, bool(options & 0x08), retain_handling)
            )
        else:
            if options & 0xFC or qos == 3:
                raise MalformedPacket(f"invalid v3.1.1 subscription options 0x{options:02X}")
            subs.append(Subscription(topic_filter, qos))
    if not subs:
        raise ProtocolError("SUBSCRIBE without any topic filter")
    return Subscribe(pid, subs, props)


def _codes(buf: w.Buffer, pos: int, end: int, allowed: frozenset[int]) -> list[ReasonCode]:
    if pos >= end:
        raise MalformedPacket("no reason codes")
    codes = []
    for i in range(pos, end):
        value = buf[i]
        if value not in allowed:
            raise MalformedPacket(f"reason code 0x{value:02X} is not allowed here")
        codes.append(_CODES[value])
    return codes


def parse_suback(buf: w.Buffer, pos: int, end: int, v5: bool) -> Suback:
    pid = packet_id(buf, pos, end)
    pos += 2
    props = Properties()
    if v5:
        props, pos = decode_properties(buf, pos, end, 9)
    return Suback(pid, _codes(buf, pos, end, ALLOWED[9] if v5 else SUBACK_311), props)


def parse_unsubscribe(buf: w.Buffer, pos: int, end: int, v5: bool) -> Unsubscribe:
    pid = packet_id(buf, pos, end)
    pos += 2
    props = Properties()
    if v5:
        props, pos = decode_properties(buf, pos, end, 10)
    filters: list[str] = []
    while pos < end:
        topic_filter, pos = _filter(buf, pos, end)
        filters.append(topic_filter)
    if not filters:
        raise ProtocolError("UNSUBSCRIBE without any topic filter")
    return Unsubscribe(pid, filters, props)


def parse_unsuback(buf: w.Buffer, pos: int, end: int, v5: bool) -> Unsuback:
    pid = packet_id(buf, pos, end)
    if not v5:
        _done(pos + 2, end)
        return Unsuback(pid)
    props, pos = decode_properties(buf, pos + 2, end, 11)
    return Unsuback(pid, _codes(buf, pos, end, ALLOWED[11]), props)


def parse_pingreq(buf: w.Buffer, pos: int, end: int, v5: bool) -> Pingreq:
    _done(pos, end)
    return Pingreq()


def parse_pingresp(buf: w.Buffer, pos: int, end: int, v5: bool) -> Pingresp:
    _done(pos, end)
    return Pingresp()


def _reason_and_props(
    buf: w.Buffer, pos: int, end: int, packet_type: int
) -> tuple[ReasonCode, Properties]:
    """The optional reason code and properties of DISCONNECT and AUTH (v5)."""
    if pos == end:
        return ReasonCode.SUCCESS, Properties()
    code = reason(buf[pos], packet_type)
    if end - pos == 1:
        return code, Properties()
    props, pos = decode_properties(buf, pos + 1, end, packet_type)
    _done(pos, end)
    return code, props


def parse_disconnect(buf: w.Buffer, pos: int, end: int, v5: bool) -> Disconnect:
    if not v5:
        _done(pos, end)
        return Disconnect()
    return Disconnect(*_reason_and_props(buf, pos, end, 14))


def parse_auth(buf: w.Buffer, pos: int, end: int, v5: bool) -> Auth:
    if not v5:
        raise MalformedPacket("packet type 15 is reserved in MQTT 3.1.1")
    return Auth(*_reason_and_props(buf, pos, end, 15))


PARSERS: dict[int, Parser] = {
    1: parse_connect,
    2: parse_connack,
    4: parse_puback,
    5: parse_pubrec,
    6: parse_pubrel,
    7: parse_pubcomp,
    8: parse_subscribe,
    9: parse_suback,
    10: parse_unsubscribe,
    11: parse_unsuback,
    12: parse_pingreq,
    13: parse_pingresp,
    14: parse_disconnect,
    15: parse_auth,
}
