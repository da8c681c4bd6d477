"""The server as a plain MQTT broker between clients (topics outside the device API):
anonymous clients, QoS 0/1/2, retained messages, shared subscriptions, wills, persistent
sessions and the ACL, with paho-mqtt v3.1.1 and v5 (and raw bytes where paho cannot)."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.integration.mqtt_helpers import (
    DISCONNECT,
    V5,
    V311,
    VERSION_IDS,
    VERSIONS,
    PahoClient,
    connect_packet,
    device_client,
    module_server,
    mqtt_connections,
    puback_packet,
    raw_socket,
    read_packet,
    read_until_closed,
    subscribe_packet,
    wait_until,
)
from tests.integration.server import RunningServer, start_server

ACL = [
    {"topic": "test/nosubscribe", "action": "subscribe", "allow": False},
    {"topic": "#"},
]
NO_MATCHING_SUBSCRIBERS = 0x10
NOT_AUTHORIZED = 0x87
SUBSCRIBE_FAILURE = 0x80

_ids = itertools.count()


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """A server that accepts anonymous clients and lets them use every topic but one."""
    env = {"IOTMESH_MQTT__ALLOW_ANONYMOUS": "true", "IOTMESH_MQTT__ACL": json.dumps(ACL)}
    with module_server(tmp_path_factory, "mqtt-broker", env) as server:
        yield server


def anonymous(broker: RunningServer, version: int = V311, **kwargs: Any) -> PahoClient:
    """An anonymous client, not yet connected (use as a context manager)."""
    return PahoClient(broker.mqtt_port, None, version=version, **kwargs)


def unique(prefix: str) -> str:
    return f"test/{prefix}/{next(_ids)}"


@pytest.mark.parametrize("qos", [0, 1, 2], ids=["qos0", "qos1", "qos2"])
@pytest.mark.parametrize(
    ("pub_version", "sub_version"),
    [(V311, V311), (V5, V5), (V311, V5), (V5, V311)],
    ids=["v311", "v5", "v311-to-v5", "v5-to-v311"],
)
def test_anonymous_clients_publish_and_subscribe(
    broker: RunningServer, qos: int, pub_version: int, sub_version: int
) -> None:
    topic = unique("pubsub")
    with (
        device_client(broker.mqtt_port, None, sub_version) as sub,
        device_client(broker.mqtt_port, None, pub_version) as pub,
    ):
        sub.subscribed("test/pubsub/+", qos=2)
        for i in range(3):
            rc = pub.publish(topic, f"m{i}".encode(), qos=qos)
            assert rc.value == 0, rc
        for i in range(3):
            message = sub.expect(topic)
            assert (message.payload, message.qos, message.retain) == (f"m{i}".encode(), qos, False)


def test_v5_publish_without_subscribers_gets_no_matching_subscribers(
    broker: RunningServer,
) -> None:
    with device_client(broker.mqtt_port, None, V5) as pub:
        assert pub.publish(unique("nobody"), b"x", qos=1).value == NO_MATCHING_SUBSCRIBERS


@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_retained_message_is_kept_then_cleared(broker: RunningServer, version: int) -> None:
    topic = unique("retain")
    with device_client(broker.mqtt_port, None, version) as pub:
        pub.publish(topic, b"on", qos=1, retain=True)
        with device_client(broker.mqtt_port, None, version) as late:
            late.subscribed(topic)
            message = late.expect(topic)
            assert (message.payload, message.retain) == (b"on", True)

        pub.publish(topic, b"", qos=1, retain=True)  # clears the retained message
        with device_client(broker.mqtt_port, None, version) as later:
            later.subscribed(topic)
            # Retained messages come right after the SUBACK, before anything published
            # later: if the marker is the first message, nothing was retained.
            pub.publish(topic, b"marker", qos=1)
            message = later.expect(topic)
            assert (message.payload, message.retain) == (b"marker", False)


@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_shared_subscription_delivers_each_message_to_one_member(
    broker: RunningServer, version: int
) -> None:
    topic = unique("shared")
    end = topic + "/end"
    count = 20
    with (
        device_client(broker.mqtt_port, None, version) as a,
        device_client(broker.mqtt_port, None, version) as b,
        device_client(broker.mqtt_port, None, version) as pub,
    ):
        for member in (a, b):
            member.subscribed(f"$share/g/{topic}")
            member.subscribed(end)  # a plain subscription: both get the end marker
        for i in range(count):
            pub.publish(topic, str(i).encode(), qos=1)
        pub.publish(end, b"end", qos=1)
        received = []
        for member in (a, b):
            # Deliveries to one client are in order: after "end", its share is complete.
            member.expect(end)
            received.append([m.payload for m in member.messages if m.topic == topic])
        assert sorted(received[0] + received[1], key=int) == [str(i).encode() for i in range(count)]
        assert all(received), f"round robin expected, got {received}"


@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_will_is_published_when_the_socket_closes_without_disconnect(
    broker: RunningServer, version: int
) -> None:
    topic = unique("will")
    with device_client(broker.mqtt_port, None, version) as watcher:
        watcher.subscribed(topic)
        with raw_socket(broker.mqtt_port) as sock:
            will = (topic, b"gone", 1)
            sock.sendall(connect_packet(f"will-{version}", version=version, will=will))
            connack = read_packet(sock)
            assert connack is not None
            assert connack[0] == 0x20
            assert connack[1][1] == 0, connack  # accepted
        # the socket is closed here, without DISCONNECT
        message = watcher.expect(topic)
        assert (message.payload, message.qos) == (b"gone", 1)


@pytest.mark.parametrize("will_delay", [0, 1], ids=["delay-0", "delay-1s"])
def test_v5_will_with_a_will_delay_interval_reaches_every_subscriber(
    tmp_path: Path, will_delay: int
) -> None:
    # Its own server: the bug makes the server log an error, which the module's server
    # must not see.
    (tmp_path / "data").mkdir()
    env = {"IOTMESH_MQTT__ALLOW_ANONYMOUS": "true", "IOTMESH_MQTT__ACL": json.dumps(ACL)}
    server = start_server(tmp_path / "data", tmp_path / "logs", env=env)
    try:
        topic = unique("willdelay")
        with (
            device_client(server.mqtt_port, None, V311) as old,
            device_client(server.mqtt_port, None, V5) as new,
        ):
            old.subscribed(topic)
            new.subscribed(topic)
            with raw_socket(server.mqtt_port) as sock:
                login = connect_packet(
                    "delayed-will",
                    version=V5,
                    will=(topic, b"late", 1),
                    session_expiry=30,
                    will_delay=will_delay,
                )
                sock.sendall(login)
                connack = read_packet(sock)
                assert connack is not None
                assert connack[1][1] == 0, connack
            # closed without DISCONNECT: the will is due after its delay
            message = old.expect(topic)
            assert message.payload == b"late"
            # Both copies of the will go out in the same turn of the server's loop: a
            # message published now must reach `new` after the will.
            with device_client(server.mqtt_port, None, V5) as marker:
                marker.publish(topic, b"marker", qos=1)
            assert new.expect(topic).payload == b"late"
    finally:
        server.stop()


def test_client_id_can_connect_again_after_a_will_with_delay_0(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    env = {"IOTMESH_MQTT__ALLOW_ANONYMOUS": "true", "IOTMESH_MQTT__ACL": json.dumps(ACL)}
    server = start_server(tmp_path / "data", tmp_path / "logs", env=env)
    try:
        topic = unique("willdelay0")
        with device_client(server.mqtt_port, None, V5) as watcher:
            watcher.subscribed(topic)
            login = connect_packet("comes-back", version=V5, will=(topic, b"x", 1), will_delay=0)
            with raw_socket(server.mqtt_port) as sock:
                sock.sendall(login)
                connack = read_packet(sock)
                assert connack is not None
                assert connack[1][1] == 0, connack
            with raw_socket(server.mqtt_port) as sock:
                sock.sendall(connect_packet("comes-back", version=V5))
                connack = read_packet(sock)
                assert connack is not None, "closed without CONNACK"
                assert connack[1][1] == 0, connack
    finally:
        server.stop()


@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_no_will_after_a_clean_disconnect(broker: RunningServer, version: int) -> None:
    topic = unique("nowill")
    with (
        device_client(broker.mqtt_port, None, version) as watcher,
        device_client(broker.mqtt_port, None, version) as marker,
    ):
        watcher.subscribed(topic)
        baseline = mqtt_connections(broker)
        with raw_socket(broker.mqtt_port) as sock:
            sock.sendall(
                connect_packet(f"nowill-{version}", version=version, will=(topic, b"x", 1))
            )
            connack = read_packet(sock)
            assert connack is not None
            assert connack[1][1] == 0
            sock.sendall(DISCONNECT)
            assert read_until_closed(sock) == []
        wait_until(lambda: mqtt_connections(broker) == baseline, "the server saw the disconnect")
        marker.publish(topic, b"marker", qos=1)
        assert watcher.expect(topic).payload == b"marker"


def test_will_of_a_paho_client_that_disconnects_cleanly_is_dropped(broker: RunningServer) -> None:
    topic = unique("pahowill")
    with device_client(broker.mqtt_port, None, V5) as watcher:
        watcher.subscribed(topic)
        baseline = mqtt_connections(broker)
        with anonymous(broker, V5) as leaving:
            leaving.paho.will_set(topic, b"should not be sent", qos=1)
            assert leaving.connect().value == 0
        wait_until(lambda: mqtt_connections(broker) == baseline, "the server saw the disconnect")
        with device_client(broker.mqtt_port, None, V5) as marker:
            marker.publish(topic, b"marker", qos=1)
        assert watcher.expect(topic).payload == b"marker"


def test_persistent_session_gets_messages_sent_while_offline(broker: RunningServer) -> None:
    topic = unique("persist")
    client_id = f"persistent-{next(_ids)}"
    with anonymous(broker, V311, client_id=client_id, clean_session=False) as first:
        assert first.connect().value == 0
        assert not first.session_present
        first.subscribed(topic, qos=1)
    with device_client(broker.mqtt_port, None, V5) as pub:
        for i in range(3):
            pub.publish(topic, f"offline-{i}".encode(), qos=1)
    with anonymous(broker, V311, client_id=client_id, clean_session=False) as back:
        assert back.connect().value == 0
        assert back.session_present
        got = [back.expect(topic) for _ in range(3)]
        assert [(m.payload, m.qos) for m in got] == [(f"offline-{i}".encode(), 1) for i in range(3)]
    # A clean session afterwards starts from nothing.
    with anonymous(broker, V311, client_id=client_id, clean_session=True) as fresh:
        assert fresh.connect().value == 0
        assert not fresh.session_present


def test_unacknowledged_messages_are_sent_again_on_resume(broker: RunningServer) -> None:
    """A v3.1.1 persistent session that got QoS 1 messages but never acked them."""
    topic = unique("inflight")
    client_id = f"no-acks-{next(_ids)}"
    with raw_socket(broker.mqtt_port) as sock:
        sock.sendall(connect_packet(client_id, clean=False))
        assert read_packet(sock) == (0x20, b"\x00\x00")
        sock.sendall(subscribe_packet(topic, qos=1))
        assert read_packet(sock) == (0x90, b"\x00\x01\x01")  # SUBACK, QoS 1 granted
        with device_client(broker.mqtt_port, None, V5) as pub:
            pub.publish(topic, b"one", qos=1)
            pub.publish(topic, b"two", qos=1)
        first = [read_packet(sock), read_packet(sock)]
    # Closed without acking either: both come again, with DUP set, on resume.
    name = len(topic).to_bytes(2, "big") + topic.encode()
    with raw_socket(broker.mqtt_port) as sock:
        sock.sendall(connect_packet(client_id, clean=False))
        assert read_packet(sock) == (0x20, b"\x01\x00")  # session present
        again = [read_packet(sock), read_packet(sock)]
        for got in again:
            assert got is not None
            sock.sendall(puback_packet(int.from_bytes(got[1][len(name) : len(name) + 2], "big")))
        sock.sendall(DISCONNECT)
        assert read_until_closed(sock) == []
    assert [(p[0], p[1][len(name) + 2 :]) for p in first if p] == [(0x32, b"one"), (0x32, b"two")]
    assert [(p[0], p[1][len(name) + 2 :]) for p in again if p] == [(0x3A, b"one"), (0x3A, b"two")]
    # Acked now: a third resume has nothing to send. A message published now is the first
    # thing it gets.
    with raw_socket(broker.mqtt_port) as sock:
        sock.sendall(connect_packet(client_id, clean=False))
        assert read_packet(sock) == (0x20, b"\x01\x00")
        with device_client(broker.mqtt_port, None, V5) as pub:
            pub.publish(topic, b"three", qos=1)
        third = read_packet(sock)
        assert third is not None
        assert (third[0], third[1][len(name) + 2 :]) == (0x32, b"three")


def test_message_over_the_clients_maximum_packet_size_is_discarded_not_kept_in_flight(
    broker: RunningServer,
) -> None:
    """MQTT 3.1.2.25: the server discards what the client cannot take, and the slot it
    took in the client's Receive Maximum window is free again for the next message."""
    topic = unique("max-packet")
    limits = Properties(PacketTypes.CONNECT)
    limits.MaximumPacketSize = 200
    limits.ReceiveMaximum = 1
    with anonymous(broker, V5) as sub, anonymous(broker, V5) as pub:
        sub.connect(properties=limits)
        sub.subscribed(topic, qos=1)
        pub.connect()
        pub.publish(topic, b"x" * 500, qos=1)  # over 200 bytes: never sent to `sub`
        pub.publish(topic, b"small", qos=1)
        pub.publish(topic, b"after", qos=1)
        got = [sub.expect(topic).payload, sub.expect(topic).payload]
    assert got == [b"small", b"after"]


@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_acl_denies_subscribing_to_test_nosubscribe(broker: RunningServer, version: int) -> None:
    with device_client(broker.mqtt_port, None, version) as c:
        assert [code.value for code in c.subscribe("test/nosubscribe")] == [SUBSCRIBE_FAILURE]
        # Publishing there is allowed (only subscribing is denied).
        rc = c.publish("test/nosubscribe", b"x", qos=1)
        assert rc.value in (0, NO_MATCHING_SUBSCRIBERS)
        # The connection is still fine.
        c.subscribed(unique("after-acl"))
        assert not c.disconnects


@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_wildcard_subscription_gets_nothing_from_a_denied_topic(
    broker: RunningServer, version: int
) -> None:
    with (
        device_client(broker.mqtt_port, None, version) as sub,
        device_client(broker.mqtt_port, None, version) as pub,
    ):
        codes = sub.subscribe("test/+")
        if codes[0].value >= 0x80:
            return  # refusing the whole wildcard is a way to keep the rule, too
        pub.publish("test/nosubscribe", b"secret", qos=1)
        pub.publish("test/acl-marker", b"marker", qos=1)
        # Deliveries to one client keep their order: the marker must come first.
        assert sub.expect("test/+").payload == b"marker"


@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_anonymous_connect_is_refused_by_default(server: RunningServer, version: int) -> None:
    with anonymous(server, version) as c:
        assert c.connect().value == NOT_AUTHORIZED  # paho shows v3.1.1 rc 5 as 0x87
        c.wait_disconnected()
    with raw_socket(server.mqtt_port) as sock:
        sock.sendall(connect_packet("anonymous-raw"))
        assert read_packet(sock) == (0x20, b"\x00\x05")  # v3.1.1 CONNACK return code 5
        assert read_packet(sock) is None
