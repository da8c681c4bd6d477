"""Persistent MQTT sessions survive a restart of the server (SIGTERM and kill -9).

Real `iotmesh run` processes on one data dir, stopped and started again, with paho-mqtt
v3.1.1 and v5 clients (raw bytes where paho hides what is checked). What survives is
read back through the protocol (CONNACK session present, the messages) and, for what
must be gone, from `mqtt-sessions.sqlite` itself after the server stopped.
"""

from __future__ import annotations

import itertools
import json
import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.integration.mqtt_helpers import (
    DISCONNECT,
    HOST,
    V5,
    V311,
    VERSION_IDS,
    VERSIONS,
    WAIT_S,
    PahoClient,
    assert_no_errors_logged,
    connect_packet,
    device_client,
    new_device,
    puback_packet,
    raw_socket,
    read_packet,
    read_until_closed,
    set_shared,
    subscribe_packet,
    wait_until,
)
from tests.integration.server import RunningServer, start_server

ACL = [{"topic": "test/#"}]
BROKER_ENV = {"IOTMESH_MQTT__ALLOW_ANONYMOUS": "true", "IOTMESH_MQTT__ACL": json.dumps(ACL)}
SESSIONS_FILE = "mqtt-sessions.sqlite"
HOUR = 3600

_ids = itertools.count()


class SessionClient(PahoClient):
    """A PahoClient that asks for a persistent session in v5 too (clean start 0 and a
    Session Expiry Interval); in v3.1.1 that is Clean Session 0."""

    def __init__(
        self,
        port: int,
        client_id: str,
        version: int,
        username: str | None = None,
        expiry: int = HOUR,
        clean: bool = False,
    ) -> None:
        super().__init__(port, username, version=version, client_id=client_id, clean_session=clean)
        self.expiry = expiry
        self.clean = clean

    def connect(self, timeout: float = WAIT_S) -> Any:
        if self.version != V5:
            return super().connect(timeout)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.expiry
        self.paho.connect(
            HOST, self.port, keepalive=self.keepalive, clean_start=self.clean, properties=props
        )
        self.paho.loop_start()
        self._started = True
        wait_until(lambda: self.connack is not None or self.disconnects, "CONNACK", timeout)
        assert self.connack is not None, f"closed without CONNACK: {self.disconnects}"
        return self.connack[0]


class Servers:
    """Starts, restarts and finally stops the server of one data dir."""

    def __init__(self, root: Path, env: dict[str, str] | None) -> None:
        self.root = root
        self.data_dir = root / "data"
        self.data_dir.mkdir()
        self.env = env
        self.runs = 0
        self.current = self._start()

    def _start(self) -> RunningServer:
        self.runs += 1
        return start_server(self.data_dir, self.root / f"logs{self.runs}", env=self.env)

    def restart(self, how: str) -> RunningServer:
        """Stop the server (SIGTERM, or kill -9) and start it again on the same data."""
        if how == "kill9":
            self.current.kill9()
        else:
            assert self.current.stop(signal.SIGTERM) == 0
            assert_no_errors_logged(self.current)
        self.current = self._start()
        return self.current

    def stop(self) -> None:
        self.current.stop()


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    s = Servers(tmp_path, BROKER_ENV)
    try:
        yield s
    finally:
        s.stop()


def stored(data_dir: Path) -> dict[str, Any]:
    """What the session file holds (read while no server runs): sessions, subscriptions
    and queued messages by client id."""
    db = sqlite3.connect(data_dir / SESSIONS_FILE)
    try:
        sessions = {r[0]: r[1] for r in db.execute("SELECT client_id, expiry_s FROM sessions")}
        subs = db.execute("SELECT client_id, topic_filter FROM subscriptions").fetchall()
        queue = db.execute("SELECT client_id, payload FROM queue ORDER BY seq").fetchall()
    finally:
        db.close()
    return {"sessions": sessions, "subscriptions": subs, "queue": queue}


def publish_all(port: int, topic: str, payloads: list[str], qos: int = 1) -> None:
    with device_client(port, None, V5) as pub:
        for payload in payloads:
            rc = pub.publish(topic, payload.encode(), qos=qos)
            assert rc.value == 0, rc


def received(client: PahoClient, topic: str, n: int) -> list[tuple[bytes, int]]:
    return [(m.payload, m.qos) for m in (client.expect(topic) for _ in range(n))]


@pytest.mark.parametrize("how", ["sigterm", "kill9"])
@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_session_and_queued_messages_survive_a_restart(
    servers: Servers, version: int, how: str
) -> None:
    topic = f"test/persist/{next(_ids)}"
    client_id = f"survivor-{version}-{how}"
    port = servers.current.mqtt_port
    with SessionClient(port, client_id, version) as first:
        assert first.connect().value == 0
        assert not first.session_present
        first.subscribed("test/persist/#", qos=1)
    # Offline: acknowledged messages are stored before their PUBACK...
    publish_all(port, topic, ["before-0", "before-1"])
    server = servers.restart(how)
    # ...and messages published after the restart are queued for the restored session.
    publish_all(server.mqtt_port, topic, ["after-0", "after-1"])
    with SessionClient(server.mqtt_port, client_id, version) as back:
        assert back.connect().value == 0
        assert back.session_present
        got = received(back, topic, 4)
    assert got == [(p.encode(), 1) for p in ["before-0", "before-1", "after-0", "after-1"]]
    # Delivered and acknowledged: a clean stop leaves the session without messages.
    server.stop()
    assert stored(servers.data_dir)["queue"] == []
    assert list(stored(servers.data_dir)["sessions"]) == [client_id]


@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_a_subscription_acked_while_connected_survives_kill_9(
    servers: Servers, version: int
) -> None:
    """The client never disconnected: SUBACK alone means the session is stored."""
    topic = f"test/connected/{next(_ids)}"
    client_id = f"connected-{version}"
    with SessionClient(servers.current.mqtt_port, client_id, version) as first:
        assert first.connect().value == 0
        first.subscribed(topic, qos=2)
        server = servers.restart("kill9")
    publish_all(server.mqtt_port, topic, ["q1", "q2"], qos=2)
    with SessionClient(server.mqtt_port, client_id, version) as back:
        assert back.connect().value == 0
        assert back.session_present
        assert received(back, topic, 2) == [(b"q1", 2), (b"q2", 2)]


def test_unacknowledged_messages_come_again_after_a_clean_stop(servers: Servers) -> None:
    """Messages in flight when the server stops are stored with their packet ids and
    sent again with DUP set, as on any resume (v3.1.1, raw bytes)."""
    topic = f"test/inflight/{next(_ids)}"
    client_id = "no-acks"
    name = len(topic).to_bytes(2, "big") + topic.encode()
    with raw_socket(servers.current.mqtt_port) as sock:
        sock.sendall(connect_packet(client_id, clean=False))
        assert read_packet(sock) == (0x20, b"\x00\x00")
        sock.sendall(subscribe_packet(topic, qos=1))
        assert read_packet(sock) == (0x90, b"\x00\x01\x01")
        publish_all(servers.current.mqtt_port, topic, ["one", "two"])
        first = [read_packet(sock), read_packet(sock)]
        server = servers.restart("sigterm")  # the server closes this connection
    assert [(p[0], p[1][len(name) + 2 :]) for p in first if p] == [(0x32, b"one"), (0x32, b"two")]
    with raw_socket(server.mqtt_port) as sock:
        sock.sendall(connect_packet(client_id, clean=False))
        assert read_packet(sock) == (0x20, b"\x01\x00")  # session present
        again = [read_packet(sock), read_packet(sock)]
        for got in again:
            assert got is not None
            sock.sendall(puback_packet(int.from_bytes(got[1][len(name) : len(name) + 2], "big")))
        sock.sendall(DISCONNECT)
        assert read_until_closed(sock) == []
    # The same packet ids, DUP set.
    assert [p[1][: len(name) + 2] for p in again if p] == [
        p[1][: len(name) + 2] for p in first if p
    ]
    assert [(p[0], p[1][len(name) + 2 :]) for p in again if p] == [(0x3A, b"one"), (0x3A, b"two")]


def test_v5_message_properties_and_subscription_identifier_survive(servers: Servers) -> None:
    topic = f"test/props/{next(_ids)}"
    client_id = "props"
    port = servers.current.mqtt_port
    with SessionClient(port, client_id, V5) as first:
        assert first.connect().value == 0
        sub_props = Properties(PacketTypes.SUBSCRIBE)
        sub_props.SubscriptionIdentifier = 42
        rc, mid = first.paho.subscribe(topic, qos=1, properties=sub_props)
        assert rc == mqtt.MQTT_ERR_SUCCESS
        wait_until(lambda: first.subacks.get(mid), "SUBACK")
    with device_client(port, None, V5) as pub:
        props = Properties(PacketTypes.PUBLISH)
        props.UserProperty = ("k", "v")
        props.ContentType = "text/plain"
        props.ResponseTopic = "test/reply"
        props.CorrelationData = b"\x00\x01"
        props.MessageExpiryInterval = HOUR
        info = pub.paho.publish(topic, b"with-props", qos=1, properties=props)
        wait_until(lambda: info.mid in pub.acks, "PUBACK")
    server = servers.restart("kill9")
    with SessionClient(server.mqtt_port, client_id, V5) as back:
        assert back.connect().value == 0
        assert back.session_present
        message = back.expect(topic)
    got = message.properties
    assert message.payload == b"with-props"
    assert got.UserProperty == [("k", "v")]
    assert got.ContentType == "text/plain"
    assert got.ResponseTopic == "test/reply"
    assert got.CorrelationData == b"\x00\x01"
    assert got.SubscriptionIdentifier == [42]
    assert 0 < got.MessageExpiryInterval <= HOUR


def test_v5_session_that_expired_while_the_server_was_down_is_gone(servers: Servers) -> None:
    topic = f"test/expired/{next(_ids)}"
    with SessionClient(servers.current.mqtt_port, "short", V5, expiry=1) as first:
        assert first.connect().value == 0
        first.subscribed(topic, qos=1)
    with SessionClient(servers.current.mqtt_port, "long", V5) as other:
        assert other.connect().value == 0
        other.subscribed(topic, qos=1)
    publish_all(servers.current.mqtt_port, topic, ["for-both"])
    servers.current.stop()
    assert stored(servers.data_dir)["sessions"] == {"short": 1, "long": HOUR}
    time.sleep(1.2)  # the short session's expiry passes while no server runs
    server = servers.restart("sigterm")
    publish_all(server.mqtt_port, topic, ["after"])
    with SessionClient(server.mqtt_port, "short", V5, expiry=0) as back:
        assert back.connect().value == 0
        assert not back.session_present
    server.stop()
    db = stored(servers.data_dir)
    assert db["sessions"] == {"long": HOUR}
    assert db["queue"] == [("long", b"for-both"), ("long", b"after")]


def test_v311_session_expiry_is_mqtt_max_session_expiry(tmp_path: Path) -> None:
    """v3.1.1 has no expiry of its own: `mqtt.max_session_expiry_s` applies."""
    env = {**BROKER_ENV, "IOTMESH_MQTT__MAX_SESSION_EXPIRY_S": "1"}
    servers = Servers(tmp_path, env)
    try:
        with SessionClient(servers.current.mqtt_port, "v311-short", V311) as first:
            assert first.connect().value == 0
            first.subscribed("test/v311/#", qos=1)
        servers.current.stop()
        assert stored(servers.data_dir)["sessions"] == {"v311-short": 1}
        time.sleep(1.2)
        server = servers.restart("sigterm")
        with SessionClient(server.mqtt_port, "v311-short", V311) as back:
            assert back.connect().value == 0
            assert not back.session_present
    finally:
        servers.stop()
    # The session of the second connection is a new one: the old subscription is gone.
    assert stored(servers.data_dir)["subscriptions"] == []


@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_clean_sessions_leave_nothing_behind(servers: Servers, version: int) -> None:
    port = servers.current.mqtt_port
    # A clean session from the start...
    with SessionClient(port, f"clean-{version}", version, expiry=0, clean=True) as clean:
        assert clean.connect().value == 0
        clean.subscribed("test/clean/#", qos=1)
    # ...and a persistent one that a clean start replaces.
    with SessionClient(port, f"replaced-{version}", version) as persistent:
        assert persistent.connect().value == 0
        persistent.subscribed("test/replaced/#", qos=1)
    publish_all(port, "test/replaced/x", ["queued"])
    with SessionClient(port, f"replaced-{version}", version, expiry=0, clean=True) as again:
        assert again.connect().value == 0
        assert not again.session_present
        server = servers.restart("kill9")  # the CONNACK came after the delete was written
    with SessionClient(server.mqtt_port, f"replaced-{version}", version) as back:
        assert back.connect().value == 0
        assert not back.session_present
        back.paho.disconnect()
        back.wait_disconnected()
    server.stop()
    db = stored(servers.data_dir)
    assert f"clean-{version}" not in db["sessions"]
    assert db["queue"] == []
    assert all(client != f"clean-{version}" for client, _ in db["subscriptions"])


def test_v5_disconnect_with_expiry_0_deletes_the_stored_session(servers: Servers) -> None:
    with SessionClient(servers.current.mqtt_port, "changes-mind", V5) as client:
        assert client.connect().value == 0
        client.subscribed("test/mind/#", qos=1)
        props = Properties(PacketTypes.DISCONNECT)
        props.SessionExpiryInterval = 0
        client.paho.disconnect(properties=props)
        client.wait_disconnected()
    servers.current.stop()
    assert stored(servers.data_dir)["sessions"] == {}


def test_queue_of_an_offline_session_is_bounded_across_restarts(tmp_path: Path) -> None:
    env = {**BROKER_ENV, "IOTMESH_MQTT__MAX_QUEUED_MESSAGES": "3"}
    servers = Servers(tmp_path, env)
    topic = "test/bounded/x"
    try:
        with SessionClient(servers.current.mqtt_port, "bounded", V311) as first:
            assert first.connect().value == 0
            first.subscribed(topic, qos=1)
        publish_all(servers.current.mqtt_port, topic, [f"m{i}" for i in range(5)])
        server = servers.restart("kill9")
        publish_all(server.mqtt_port, topic, ["late"])  # full: dropped, as in memory
        with SessionClient(server.mqtt_port, "bounded", V311) as back:
            assert back.connect().value == 0
            assert back.session_present
            assert received(back, topic, 3) == [(b"m0", 1), (b"m1", 1), (b"m2", 1)]
            with pytest.raises(AssertionError, match="timed out"):
                back.expect(topic, timeout=0.5)
    finally:
        servers.stop()


@pytest.mark.parametrize("how", ["sigterm", "kill9"])
def test_device_gets_shared_attribute_changes_made_while_it_was_offline(
    tmp_path: Path, how: str
) -> None:
    """The ThingsBoard case: a device with a persistent session subscribed to
    v1/devices/me/attributes gets the shared attributes set over REST while it was
    away, across a restart, when it comes back."""
    servers = Servers(tmp_path, None)
    topic = "v1/devices/me/attributes"
    try:
        with servers.current.admin() as admin:
            device = new_device(admin, "persistent-thermostat")
        token = device["access_token"]
        with SessionClient(servers.current.mqtt_port, "thermostat", V311, token) as first:
            assert first.connect().value == 0
            first.subscribed(topic, qos=1)
            with servers.current.admin() as admin:
                set_shared(admin, device["id"], {"online": 1})
            assert first.expect_json(topic) == {"online": 1}
        with servers.current.admin() as admin:
            set_shared(admin, device["id"], {"target": 21.5})  # 200: stored for the device
        server = servers.restart(how)
        with server.admin() as admin:
            set_shared(admin, device["id"], {"mode": "eco"})  # to the restored session
        with SessionClient(server.mqtt_port, "thermostat", V311, token) as back:
            assert back.connect().value == 0
            assert back.session_present
            assert back.expect_json(topic) == {"target": 21.5}
            assert back.expect_json(topic) == {"mode": "eco"}
            # Online again: pushes go straight to the connection, not into the queue.
            with server.admin() as admin:
                set_shared(admin, device["id"], {"mode": "comfort"})
            assert back.expect_json(topic) == {"mode": "comfort"}
            with pytest.raises(AssertionError, match="timed out"):
                back.expect(topic, timeout=0.5)
        assert_no_errors_logged(server)
    finally:
        servers.stop()


def test_session_of_a_deleted_device_is_dropped_at_start(tmp_path: Path) -> None:
    servers = Servers(tmp_path, None)
    try:
        with servers.current.admin() as admin:
            device = new_device(admin, "short-lived")
        with SessionClient(
            servers.current.mqtt_port, "short-lived", V5, device["access_token"]
        ) as first:
            assert first.connect().value == 0
            first.subscribed("v1/devices/me/rpc/request/+", qos=1)
        with servers.current.admin() as admin:
            assert admin.delete(f"/api/v1/devices/{device['id']}").status_code in (200, 204)
        servers.restart("sigterm")
    finally:
        servers.stop()
    assert stored(servers.data_dir)["sessions"] == {}
