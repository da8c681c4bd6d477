"""Shared pieces of the MQTT integration tests.

`PahoClient` wraps a real paho-mqtt client (its network loop on a background thread)
and turns its callbacks into things a test can wait for: the CONNACK, the ack of one
PUBLISH, the SUBACK of one SUBSCRIBE, the next message on a topic, the end of the
connection. `raw_*` speak bytes for what no client library will send (garbage, a will
without DISCONNECT, oversized headers). The REST helpers are small shortcuts over the
admin API.

Every wait here is bounded; a timeout fails the test with what was seen so far.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

import httpx
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from tests.integration.server import RunningServer, start_server

HOST = "127.0.0.1"
WAIT_S = 10.0  # upper bound of every wait: only reached when something hangs
T0 = 1_700_000_000_000  # explicit timestamps: nothing is hidden by a same-ts overwrite
FAR_END = 4_000_000_000_000

V311 = 4
V5 = 5
VERSIONS = [V311, V5]
VERSION_IDS = ["v311", "v5"]

T = TypeVar("T")


def wait_until(
    check: Callable[[], T | None], what: str, timeout: float = WAIT_S, interval: float = 0.05
) -> T:
    """Poll `check` until it returns something truthy (bounded); return that."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class PahoClient:
    """A paho-mqtt client whose events a test can wait for.

    Use as a context manager: the network thread is stopped (and the client disconnected
    if it still is) on exit. paho's own reconnecting is pushed out to 60 s, so a
    connection the server closes stays closed for the rest of a test.
    """

    def __init__(
        self,
        port: int,
        username: str | None = None,
        *,
        version: int = V311,
        client_id: str = "",
        clean_session: bool = True,
        keepalive: int = 60,
    ) -> None:
        self.port = port
        self.version = version
        self.keepalive = keepalive
        if version == V5:
            self.paho = mqtt.Client(
                CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
            )
        else:
            self.paho = mqtt.Client(
                CallbackAPIVersion.VERSION2,
                client_id=client_id,
                protocol=mqtt.MQTTv311,
                clean_session=clean_session,
            )
        self.paho.reconnect_delay_set(60, 60)
        if username is not None:
            self.paho.username_pw_set(username)
        self._cond = threading.Condition()
        self.connack: tuple[ReasonCode, bool] | None = None
        self.acks: dict[int, ReasonCode] = {}
        self.subacks: dict[int, list[ReasonCode]] = {}
        self.unsubacks: dict[int, list[ReasonCode]] = {}
        self.messages: list[mqtt.MQTTMessage] = []
        self.disconnects: list[ReasonCode] = []
        self.paho.on_connect = self._on_connect
        self.paho.on_publish = self._on_publish
        self.paho.on_subscribe = self._on_subscribe
        self.paho.on_unsubscribe = self._on_unsubscribe
        self.paho.on_message = self._on_message
        self.paho.on_disconnect = self._on_disconnect
        self._started = False

    # -- paho callbacks (network thread) --------------------------------------------------

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        with self._cond:
            self.connack = (rc, bool(flags.session_present))
            self._cond.notify_all()

    def _on_publish(self, client: Any, userdata: Any, mid: int, rc: Any, props: Any) -> None:
        with self._cond:
            self.acks[mid] = rc
            self._cond.notify_all()

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, rcs: Any, props: Any) -> None:
        with self._cond:
            self.subacks[mid] = list(rcs)
            self._cond.notify_all()

    def _on_unsubscribe(self, client: Any, userdata: Any, mid: int, rcs: Any, props: Any) -> None:
        with self._cond:
            self.unsubacks[mid] = list(rcs)
            self._cond.notify_all()

    def _on_message(self, client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append(message)
            self._cond.notify_all()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        with self._cond:
            self.disconnects.append(rc)
            self._cond.notify_all()

    # -- waiting --------------------------------------------------------------------------

    def _wait(self, check: Callable[[], T | None], what: str, timeout: float) -> T:
        with self._cond:
            ok = self._cond.wait_for(check, timeout)
            if not ok:
                raise AssertionError(
                    f"timed out after {timeout}s waiting for {what}; "
                    f"messages={[(m.topic, m.payload) for m in self.messages]}, "
                    f"disconnects={self.disconnects}"
                )
            return ok

    # -- operations -----------------------------------------------------------------------

    def connect(self, timeout: float = WAIT_S, properties: Any = None) -> ReasonCode:
        """Connect and wait for the CONNACK (or the end of the connection).

        `properties`: v5 CONNECT properties (paho's `Properties(PacketTypes.CONNECT)`)."""
        self.paho.connect(HOST, self.port, keepalive=self.keepalive, properties=properties)
        self.paho.loop_start()
        self._started = True
        self._wait(lambda: self.connack is not None or self.disconnects, "CONNACK", timeout)
        if self.connack is None:
            raise AssertionError(f"closed without CONNACK: {self.disconnects}")
        return self.connack[0]

    @property
    def session_present(self) -> bool:
        assert self.connack is not None
        return self.connack[1]

    def publish(
        self,
        topic: str,
        payload: bytes | str | dict[str, Any] | list[Any],
        qos: int = 1,
        retain: bool = False,
        timeout: float = WAIT_S,
    ) -> ReasonCode:
        """Publish and wait for its PUBACK/PUBCOMP (for QoS 0: until it was written).

        Returns the reason code of the ack (always success in v3.1.1).
        """
        if isinstance(payload, dict | list):
            payload = json.dumps(payload)
        info = self.paho.publish(topic, payload, qos=qos, retain=retain)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS, f"paho could not queue the publish: {info.rc}"
        mid = info.mid
        return self._wait(lambda: self.acks.get(mid), f"ack of {topic} (mid {mid})", timeout)

    def publish_nowait(self, topic: str, payload: bytes | str, qos: int = 1) -> int:
        info = self.paho.publish(topic, payload, qos=qos)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS, f"paho could not queue the publish: {info.rc}"
        return info.mid

    def subscribe(self, topic: str, qos: int = 1, timeout: float = WAIT_S) -> list[ReasonCode]:
        """Subscribe and wait for the SUBACK; return its reason codes."""
        rc, mid = self.paho.subscribe(topic, qos)
        assert rc == mqtt.MQTT_ERR_SUCCESS, f"paho could not send SUBSCRIBE: {rc}"
        assert mid is not None
        return self._wait(lambda: self.subacks.get(mid), f"SUBACK of {topic}", timeout)

    def subscribed(self, topic: str, qos: int = 1) -> None:
        """Subscribe and insist that it was granted."""
        codes = self.subscribe(topic, qos)
        assert [c.value for c in codes] == [qos], f"SUBACK of {topic}: {codes}"

    def unsubscribe(self, topic: str, timeout: float = WAIT_S) -> list[ReasonCode]:
        """Unsubscribe and wait for the UNSUBACK; return its reason codes (v5)."""
        rc, mid = self.paho.unsubscribe(topic)
        assert rc == mqtt.MQTT_ERR_SUCCESS, f"paho could not send UNSUBSCRIBE: {rc}"
        assert mid is not None
        self._wait(lambda: mid in self.unsubacks, f"UNSUBACK of {topic}", timeout)
        return self.unsubacks[mid]

    def expect(self, topic: str = "#", timeout: float = WAIT_S) -> mqtt.MQTTMessage:
        """Take the first received message whose topic matches the filter `topic`."""

        def first() -> mqtt.MQTTMessage | None:
            for message in self.messages:
                if mqtt.topic_matches_sub(topic, message.topic):
                    return message
            return None

        message = self._wait(first, f"a message on {topic}", timeout)
        with self._cond:
            self.messages.remove(message)
        return message

    def expect_json(self, topic: str = "#", timeout: float = WAIT_S) -> Any:
        return json.loads(self.expect(topic, timeout).payload)

    def wait_disconnected(self, timeout: float = WAIT_S) -> ReasonCode:
        """Wait until the connection ended; return paho's reason for it."""
        self._wait(lambda: bool(self.disconnects), "disconnect", timeout)
        return self.disconnects[0]

    def close(self) -> None:
        """Disconnect cleanly (if still connected) and stop the network thread."""
        if self.paho.is_connected():
            self.paho.disconnect()
        if self._started:
            self.paho.loop_stop()
            self._started = False

    def __enter__(self) -> PahoClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextmanager
def device_client(
    port: int, token: str | None, version: int = V311, **kwargs: Any
) -> Iterator[PahoClient]:
    """A connected PahoClient (CONNACK success is asserted)."""
    with PahoClient(port, token, version=version, **kwargs) as client:
        rc = client.connect()
        assert rc.value == 0, f"CONNECT refused: {rc}"
        yield client


# -- raw MQTT bytes -----------------------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(s: str | bytes) -> bytes:
    data = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(data)) + data


def packet(first_byte: int, body: bytes) -> bytes:
    """A whole packet: fixed header (with the remaining length) and body."""
    return bytes([first_byte]) + _varint(len(body)) + body


def connect_packet(
    client_id: str,
    *,
    version: int = V311,
    username: str | None = None,
    will: tuple[str, bytes, int] | None = None,
    keepalive: int = 60,
    clean: bool = True,
    session_expiry: int | None = None,
    will_delay: int | None = None,
) -> bytes:
    """CONNECT with an optional will (topic, payload, qos).

    `session_expiry` and `will_delay` are the v5 properties of those names.
    """
    flags = 0x02 if clean else 0
    if will is not None:
        flags |= 0x04 | (will[2] << 3)
    if username is not None:
        flags |= 0x80
    body = _str("MQTT") + bytes([version, flags]) + struct.pack("!H", keepalive)
    if version == V5:
        props = b"" if session_expiry is None else b"\x11" + struct.pack("!I", session_expiry)
        body += _varint(len(props)) + props
    body += _str(client_id)
    if will is not None:
        if version == V5:
            props = b"" if will_delay is None else b"\x18" + struct.pack("!I", will_delay)
            body += _varint(len(props)) + props
        body += _str(will[0]) + _str(will[1])
    if username is not None:
        body += _str(username)
    return packet(0x10, body)


def publish_packet(
    topic: str, payload: bytes, *, version: int = V311, qos: int = 0, packet_id: int = 1
) -> bytes:
    """A PUBLISH (the packet id is only written for QoS 1 and 2)."""
    body = _str(topic) + (struct.pack("!H", packet_id) if qos else b"")
    body += (_varint(0) if version == V5 else b"") + payload
    return packet(0x30 | qos << 1, body)


def subscribe_packet(topic_filter: str, qos: int, packet_id: int = 1) -> bytes:
    """A v3.1.1 SUBSCRIBE of one filter."""
    return packet(0x82, struct.pack("!H", packet_id) + _str(topic_filter) + bytes([qos]))


def puback_packet(packet_id: int) -> bytes:
    return packet(0x40, struct.pack("!H", packet_id))


DISCONNECT = b"\xe0\x00"


@contextmanager
def raw_socket(port: int, timeout: float = WAIT_S) -> Iterator[socket.socket]:
    sock = socket.create_connection((HOST, port), timeout=timeout)
    try:
        yield sock
    finally:
        sock.close()


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def read_packet(sock: socket.socket) -> tuple[int, bytes] | None:
    """Read one packet: (first byte, body), or None at end of stream.

    Raises:
        TimeoutError: nothing arrived within the socket's timeout.
    """
    try:
        head = _recv_exact(sock, 1)
        if head is None:
            return None
        length, shift = 0, 0
        for _ in range(4):
            byte = _recv_exact(sock, 1)
            if byte is None:
                return None
            length |= (byte[0] & 0x7F) << shift
            shift += 7
            if not byte[0] & 0x80:
                break
        body = _recv_exact(sock, length)
    except ConnectionResetError:
        return None
    if body is None:
        return None
    return head[0], body


def read_until_closed(sock: socket.socket, max_packets: int = 100) -> list[tuple[int, bytes]]:
    """Every packet the server still sends until it closes the connection.

    Raises:
        AssertionError: the connection stayed open (socket timeout) or sent too much.
    """
    seen: list[tuple[int, bytes]] = []
    for _ in range(max_packets):
        try:
            got = read_packet(sock)
        except TimeoutError:
            raise AssertionError(f"the server did not close the connection; got {seen}") from None
        if got is None:
            return seen
        seen.append(got)
    raise AssertionError(f"the server kept sending: {seen[:5]}...")


# -- REST -----------------------------------------------------------------------------------


def new_device(admin: httpx.Client, name: str, gateway: bool = False) -> dict[str, Any]:
    r = admin.post("/api/v1/devices", json={"name": name, "gateway": gateway})
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


def points(admin: httpx.Client, device_id: str, key: str) -> list[dict[str, Any]]:
    """Every stored point of one key, oldest first."""
    r = admin.get(
        f"/api/v1/devices/{device_id}/telemetry",
        params={"keys": key, "start_ts": 0, "end_ts": FAR_END, "order": "ASC", "limit": 100_000},
    )
    assert r.status_code == 200, r.text
    found: list[dict[str, Any]] = r.json().get(key, [])
    return found


def telemetry_keys(admin: httpx.Client, device_id: str) -> list[str]:
    r = admin.get(f"/api/v1/devices/{device_id}/telemetry/keys")
    assert r.status_code == 200, r.text
    keys: list[str] = r.json()
    return keys


def attributes(admin: httpx.Client, device_id: str, scope: str) -> dict[str, Any]:
    """A device's attributes of one scope as {key: value}."""
    r = admin.get(f"/api/v1/devices/{device_id}/attributes", params={"scope": scope})
    assert r.status_code == 200, r.text
    return {a["key"]: a["value"] for a in r.json()}


def set_shared(admin: httpx.Client, device_id: str, values: dict[str, Any]) -> None:
    r = admin.post(
        f"/api/v1/devices/{device_id}/attributes", params={"scope": "SHARED"}, json=values
    )
    assert r.status_code == 200, r.text


def assert_no_errors_logged(server: RunningServer) -> None:
    """The server logged no ERROR and no traceback (an internal failure we did not see)."""
    bad = [
        line for line in server.output().splitlines() if " ERROR " in line or "Traceback" in line
    ]
    assert not bad, "the server logged errors:\n" + "\n".join(bad[:20])


def mqtt_connections(server: RunningServer) -> int:
    """How many MQTT connections the server has open (from /healthz)."""
    detail = httpx.get(server.url + "/healthz", timeout=10).json()["services"]["mqtt"]["detail"]
    return int(detail.split()[0])


@contextmanager
def rpc_call(server: RunningServer, device_id: str, body: dict[str, Any]) -> Iterator[Future[Any]]:
    """Start a REST RPC call on a thread; the future is its httpx.Response."""

    def call() -> httpx.Response:
        with server.admin() as admin:
            return admin.post(f"/api/v1/devices/{device_id}/rpc", json=body)

    with ThreadPoolExecutor(1, thread_name_prefix="rest-rpc") as pool:
        yield pool.submit(call)


@contextmanager
def module_server(
    factory: Any, name: str, env: dict[str, str] | None = None
) -> Iterator[RunningServer]:
    """A server for a whole test module, checked for logged errors when it stops."""
    root = factory.mktemp(name)
    (root / "data").mkdir()
    server = start_server(root / "data", root / "logs", env=env)
    try:
        yield server
    finally:
        server.stop()
    assert_no_errors_logged(server)
