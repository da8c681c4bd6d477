"""Retained messages survive a restart of the server (SIGTERM and kill -9).

Real `iotmesh run` processes on one data dir, stopped and started again, with paho-mqtt
v3.1.1 and v5 clients. What survives is read back through the protocol (a new
subscriber gets it, retain flag set); what must be gone, also from the `retained`
table of `mqtt-sessions.sqlite`.
"""

from __future__ import annotations

import itertools
import socket
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.integration.mqtt_helpers import (
    V5,
    V311,
    VERSION_IDS,
    VERSIONS,
    WAIT_S,
    connect_packet,
    device_client,
    raw_socket,
    read_packet,
    wait_until,
)
from tests.integration.test_mqtt_sessions import BROKER_ENV, SESSIONS_FILE, Servers

NO_MATCHING_SUBSCRIBERS = 0x10  # v5: a success too, the message is retained all the same

_ids = itertools.count()


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    s = Servers(tmp_path, BROKER_ENV)
    try:
        yield s
    finally:
        s.stop()


def stored_retained(data_dir: Path) -> dict[str, bytes]:
    """The `retained` table by topic (WAL: readable while the server runs)."""
    db = sqlite3.connect(data_dir / SESSIONS_FILE, timeout=WAIT_S)
    try:
        return {t: bytes(p) for t, p in db.execute("SELECT topic, payload FROM retained")}
    finally:
        db.close()


def retain(port: int, version: int, topic: str, payload: bytes, qos: int = 1) -> None:
    """Publish a retained message; for QoS 1/2 returns after its PUBACK/PUBCOMP."""
    with device_client(port, None, version) as pub:
        rc = pub.publish(topic, payload, qos=qos, retain=True)
        assert rc.value in (0, NO_MATCHING_SUBSCRIBERS), rc


def retained_now(port: int, version: int, topic_filter: str) -> list[mqtt.MQTTMessage]:
    """What a new subscriber to `topic_filter` gets as retained messages.

    A marker published (not retained) after the SUBACK comes after every retained
    message, so everything before it was retained. The marker goes at QoS 2: paho hands
    a QoS 2 message to the application only at PUBREL, so a QoS 1 marker could overtake
    a retained QoS 2 message that had arrived before it.
    """
    marker = f"test/marker/{next(_ids)}"
    with device_client(port, None, version) as sub:
        sub.subscribed(topic_filter, qos=2)
        sub.subscribed(marker, qos=2)
        with device_client(port, None, version) as pub:
            pub.publish(marker, b"end", qos=2)
        sub.expect(marker)
        return list(sub.messages)  # nothing more comes: the marker was the last


@pytest.mark.parametrize("how", ["sigterm", "kill9"])
@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_retained_messages_survive_a_restart(servers: Servers, version: int, how: str) -> None:
    """QoS 1 and 2: acknowledged means stored, so even kill -9 right after the ack keeps
    them; a retained message replaced before the restart comes back as the new one."""
    base = f"test/retained/{next(_ids)}"
    port = servers.current.mqtt_port
    retain(port, version, f"{base}/replaced", b"old", qos=1)
    retain(port, version, f"{base}/replaced", b"new", qos=1)
    retain(port, version, f"{base}/q1", b"one", qos=1)
    retain(port, version, f"{base}/q2", b"two", qos=2)
    server = servers.restart(how)
    got = retained_now(server.mqtt_port, version, f"{base}/#")
    assert sorted((m.topic, m.payload, m.qos, m.retain) for m in got) == [
        (f"{base}/q1", b"one", 1, True),
        (f"{base}/q2", b"two", 2, True),
        (f"{base}/replaced", b"new", 1, True),
    ]
    # Still retained after a second restart (loading them did not consume them).
    server = servers.restart("sigterm")
    got = retained_now(server.mqtt_port, version, f"{base}/q1")
    assert [(m.payload, m.retain) for m in got] == [(b"one", True)]


@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_a_qos_0_retained_message_is_stored_without_waiting(servers: Servers, version: int) -> None:
    """Nobody waits for it, but it is written at once: once in the file, it survives
    kill -9."""
    topic = f"test/retained0/{next(_ids)}"
    retain(servers.current.mqtt_port, version, topic, b"zero", qos=0)
    wait_until(lambda: stored_retained(servers.data_dir).get(topic) == b"zero", "the row")
    server = servers.restart("kill9")
    got = retained_now(server.mqtt_port, version, topic)
    assert [(m.payload, m.qos, m.retain) for m in got] == [(b"zero", 0, True)]


@pytest.mark.parametrize("how", ["sigterm", "kill9"])
@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_a_cleared_retained_message_stays_cleared(servers: Servers, version: int, how: str) -> None:
    topic = f"test/cleared/{next(_ids)}"
    port = servers.current.mqtt_port
    retain(port, version, topic, b"on", qos=1)
    assert [m.payload for m in retained_now(port, version, topic)] == [b"on"]
    retain(port, version, topic, b"", qos=1)  # an empty retained payload clears it
    server = servers.restart(how)
    assert retained_now(server.mqtt_port, version, topic) == []
    assert topic not in stored_retained(servers.data_dir)


def test_v5_retained_properties_and_expiry_across_a_restart(servers: Servers) -> None:
    """A retained message whose Message Expiry Interval passed while the server was down
    is not delivered and is deleted; a live one keeps its properties and is sent with
    the expiry it has left."""
    base = f"test/expiry/{next(_ids)}"
    with device_client(servers.current.mqtt_port, None, V5) as pub:
        for name, expiry in [("short", 1), ("long", 60), ("forever", None)]:
            props = Properties(PacketTypes.PUBLISH)
            props.UserProperty = ("k", name)
            props.ContentType = "text/plain"
            props.ResponseTopic = "test/reply"
            props.CorrelationData = b"\x00\x01"
            if expiry is not None:
                props.MessageExpiryInterval = expiry
            info = pub.paho.publish(f"{base}/{name}", name.encode(), 1, True, props)
            wait_until(lambda: info.mid in pub.acks, "PUBACK")  # noqa: B023
    servers.current.stop()
    time.sleep(1.5)  # "short" expires while no server runs
    server = servers.restart("sigterm")
    got = {m.topic: m for m in retained_now(server.mqtt_port, V5, f"{base}/#")}
    assert sorted(got) == [f"{base}/forever", f"{base}/long"]
    for name in ("long", "forever"):
        message = got[f"{base}/{name}"]
        assert message.retain
        assert message.payload == name.encode()
        assert message.properties.UserProperty == [("k", name)]
        assert message.properties.ContentType == "text/plain"
        assert message.properties.ResponseTopic == "test/reply"
        assert message.properties.CorrelationData == b"\x00\x01"
    # Counted from when it was retained, downtime included.
    assert 0 < got[f"{base}/long"].properties.MessageExpiryInterval <= 59
    assert not hasattr(got[f"{base}/forever"].properties, "MessageExpiryInterval")
    server.stop()
    assert sorted(stored_retained(servers.data_dir)) == [f"{base}/forever", f"{base}/long"]


def test_v5_retained_message_expiring_while_the_server_runs_is_deleted(
    servers: Servers,
) -> None:
    topic = f"test/expiring/{next(_ids)}"
    with device_client(servers.current.mqtt_port, None, V5) as pub:
        props = Properties(PacketTypes.PUBLISH)
        props.MessageExpiryInterval = 1
        info = pub.paho.publish(topic, b"brief", 1, True, props)
        wait_until(lambda: info.mid in pub.acks, "PUBACK")
    assert stored_retained(servers.data_dir) == {topic: b"brief"}
    time.sleep(1.2)
    # Not sent to a new subscriber, and the subscription that found it expired deleted it.
    assert retained_now(servers.current.mqtt_port, V5, topic) == []
    wait_until(lambda: topic not in stored_retained(servers.data_dir), "the row deleted")
    server = servers.restart("kill9")
    assert retained_now(server.mqtt_port, V5, topic) == []


def test_a_retained_will_survives_kill_9(servers: Servers) -> None:
    """A will with the retain flag becomes the topic's retained message, stored too."""
    topic = f"test/retainedwill/{next(_ids)}"
    login = bytearray(connect_packet("dies", will=(topic, b"gone", 1)))
    login[9] |= 0x20  # the Will Retain flag (byte 9: the connect flags of a short CONNECT)
    with raw_socket(servers.current.mqtt_port) as sock:
        sock.sendall(bytes(login))
        assert read_packet(sock) == (0x20, b"\x00\x00")
        sock.shutdown(socket.SHUT_RDWR)  # gone without DISCONNECT: the will is published
    wait_until(lambda: stored_retained(servers.data_dir).get(topic) == b"gone", "the will")
    server = servers.restart("kill9")
    got = retained_now(server.mqtt_port, V311, topic)
    assert [(m.payload, m.qos, m.retain) for m in got] == [(b"gone", 1, True)]
