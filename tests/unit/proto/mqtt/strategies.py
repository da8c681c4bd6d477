"""Hypothesis strategies for valid MQTT packets, per protocol version.

Each strategy builds only packets the spec allows for that version, in the shape the
decoder returns (v3.1.1 packets carry no properties and only the reason codes v3.1.1
can express), so `decode(encode(p)) == p` is the property to test.
"""

from __future__ import annotations

import functools
from typing import Any

from hypothesis import strategies as st

from iotmesh.proto.mqtt import (
    Auth,
    Connack,
    Connect,
    Disconnect,
    Packet,
    Pingreq,
    Pingresp,
    Properties,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    ReasonCode,
    Suback,
    Subscribe,
    Subscription,
    Unsuback,
    Unsubscribe,
    Will,
)
from iotmesh.proto.mqtt.properties import BIN, PAIR, PROPERTY_DEFS, PUBLISH, STR, WILL
from iotmesh.proto.mqtt.reason_codes import ALLOWED, SUBACK_311

# MQTT strings: any code point but U+0000 and surrogates (which UTF-8 cannot carry).
text = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=12)
level = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00+#/"), max_size=6)
small_level = st.sampled_from(["", "a", "b", "$SYS", "$x", "ab", "é"])


def topic_names(levels: st.SearchStrategy[str] = level) -> st.SearchStrategy[str]:
    return (
        st.lists(levels, min_size=1, max_size=5).map("/".join).filter(bool)  # non-empty
    )


def topic_filters(levels: st.SearchStrategy[str] = level) -> st.SearchStrategy[str]:
    body = st.lists(st.one_of(levels, st.just("+")), min_size=1, max_size=5)
    return st.builds(
        lambda parts, hash_: "/".join([*parts, "#"] if hash_ else parts),
        body,
        st.booleans(),
    ).filter(bool)


def shared_or_not(filters: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    group = st.text(st.sampled_from("gh1$"), min_size=1, max_size=3)
    return st.one_of(filters, st.builds(lambda g, f: f"$share/{g}/{f}", group, filters))


def _value(kind: str, lo: int, hi: int) -> st.SearchStrategy[Any]:
    if kind == STR:
        return text
    if kind == BIN:
        return st.binary(max_size=12)
    if kind == PAIR:
        return st.tuples(text, text)
    # edge values matter most: bounds and small numbers
    return st.one_of(st.sampled_from([lo, hi]), st.integers(lo, hi))


@functools.cache
def properties(place: int) -> st.SearchStrategy[Properties]:
    optional: dict[str, st.SearchStrategy[Any]] = {}
    for d in PROPERTY_DEFS:
        if place not in d.places:
            continue
        value = _value(d.kind, d.lo, d.hi)
        if d.repeatable:
            most = 3 if d.kind == PAIR or place == PUBLISH else 1
            optional[d.name] = st.lists(value, min_size=1, max_size=most)
        else:
            optional[d.name] = value
    return st.fixed_dictionaries({}, optional=optional).map(lambda kw: Properties(**kw))


def no_properties(place: int) -> st.SearchStrategy[Properties]:
    return st.builds(Properties)


def codes(packet_type: int) -> st.SearchStrategy[ReasonCode]:
    return st.sampled_from(sorted(ALLOWED[packet_type])).map(ReasonCode)


pid = st.integers(1, 0xFFFF)


@st.composite
def connects(draw: st.DrawFn, version: int) -> Connect:
    v5 = version == 5
    props = properties if v5 else no_properties
    username = draw(st.none() | text)
    password = draw(st.none() | st.binary(max_size=8))
    if not v5 and username is None:
        password = None
    will = draw(
        st.none()
        | st.builds(
            Will,
            topic_names(),
            st.binary(max_size=16),
            st.integers(0, 2),
            st.booleans(),
            props(WILL),
        )
    )
    return Connect(
        version,
        draw(text),
        draw(st.booleans()),
        draw(st.integers(0, 0xFFFF)),
        username,
        password,
        will,
        draw(props(1)),
    )


@st.composite
def connacks(draw: st.DrawFn, version: int) -> Connack:
    if version == 5:
        code = draw(codes(2))
        return Connack(draw(st.booleans()) if code == 0 else False, code, draw(properties(2)))
    code = draw(st.sampled_from([0, 0x84, 0x85, 0x88, 0x86, 0x87]).map(ReasonCode))
    return Connack(draw(st.booleans()) if code == 0 else False, code)


@st.composite
def publishes(draw: st.DrawFn, version: int, from_client: bool = False) -> Publish:
    qos = draw(st.integers(0, 2))
    props = draw(properties(3)) if version == 5 else Properties()
    if from_client:  # only a server sends Subscription Identifiers
        props.subscription_identifiers = []
    topic = draw(topic_names())
    if version == 5 and props.topic_alias is not None and draw(st.booleans()):
        topic = ""
    return Publish(
        topic,
        draw(st.binary(max_size=40)),
        qos,
        draw(st.booleans()),
        draw(st.booleans()) if qos else False,
        draw(pid) if qos else None,
        props,
    )


def acks(cls: type[Puback | Pubrec | Pubrel | Pubcomp], version: int) -> st.SearchStrategy[Any]:
    if version == 4:
        return st.builds(cls, pid)
    return st.builds(cls, pid, codes(cls.TYPE), properties(cls.TYPE))


@st.composite
def subscriptions(draw: st.DrawFn, version: int) -> Subscription:
    topic_filter = draw(shared_or_not(topic_filters()))
    if version == 4:
        return Subscription(topic_filter, draw(st.integers(0, 2)))
    no_local = False if topic_filter.startswith("$share/") else draw(st.booleans())
    return Subscription(
        topic_filter,
        draw(st.integers(0, 2)),
        no_local,
        draw(st.booleans()),
        draw(st.integers(0, 2)),
    )


def subscribes(version: int) -> st.SearchStrategy[Subscribe]:
    props = properties(8) if version == 5 else no_properties(8)
    subs = st.lists(subscriptions(version), min_size=1, max_size=4)
    return st.builds(Subscribe, pid, subs, props)


def subacks(version: int) -> st.SearchStrategy[Suback]:
    if version == 4:
        allowed = st.sampled_from(sorted(SUBACK_311)).map(ReasonCode)
        return st.builds(Suback, pid, st.lists(allowed, min_size=1, max_size=4))
    return st.builds(Suback, pid, st.lists(codes(9), min_size=1, max_size=4), properties(9))


def unsubscribes(version: int) -> st.SearchStrategy[Unsubscribe]:
    props = properties(10) if version == 5 else no_properties(10)
    filters = st.lists(shared_or_not(topic_filters()), min_size=1, max_size=4)
    return st.builds(Unsubscribe, pid, filters, props)


def unsubacks(version: int) -> st.SearchStrategy[Unsuback]:
    if version == 4:
        return st.builds(Unsuback, pid)
    return st.builds(Unsuback, pid, st.lists(codes(11), min_size=1, max_size=4), properties(11))


def disconnects(version: int) -> st.SearchStrategy[Disconnect]:
    if version == 4:
        return st.builds(Disconnect)
    return st.builds(Disconnect, codes(14), properties(14))


def auths() -> st.SearchStrategy[Auth]:
    return st.builds(Auth, codes(15), properties(15))


@functools.cache
def packets(version: int) -> st.SearchStrategy[Packet]:
    """Any packet type valid in `version` (CONNECT included, at its own level)."""
    choices: list[st.SearchStrategy[Any]] = [
        connects(version),
        connacks(version),
        publishes(version),
        *(acks(cls, version) for cls in (Puback, Pubrec, Pubrel, Pubcomp)),
        subscribes(version),
        subacks(version),
        unsubscribes(version),
        unsubacks(version),
        st.just(Pingreq()),
        st.just(Pingresp()),
        disconnects(version),
    ]
    if version == 5:
        choices.append(auths())
    return st.one_of(choices)


@functools.cache
def client_packets(version: int) -> st.SearchStrategy[Packet]:
    """Packets a client may send after CONNECT."""
    choices: list[st.SearchStrategy[Any]] = [
        publishes(version, from_client=True),
        *(acks(cls, version) for cls in (Puback, Pubrec, Pubrel, Pubcomp)),
        subscribes(version),
        unsubscribes(version),
        st.just(Pingreq()),
        disconnects(version),
    ]
    if version == 5:
        choices.append(auths())
    return st.one_of(choices)
