"""What a real `iotmesh run` does with MQTT clients that misbehave, and with a crash
under MQTT load: bad input ends one connection, never the others; PUBACKed means stored."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.mqtt_helpers import (
    T0,
    V5,
    V311,
    PahoClient,
    assert_no_errors_logged,
    connect_packet,
    device_client,
    module_server,
    new_device,
    packet,
    points,
    raw_socket,
    read_packet,
    read_until_closed,
)
from tests.integration.server import RunningServer, start_server

TELEMETRY = "v1/devices/me/telemetry"
MALFORMED_PACKET = 0x81
PACKET_TOO_LARGE = 0x95

_names = itertools.count()
_ts = itertools.count(T0)


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with module_server(tmp_path_factory, "mqtt-robustness") as server:
        yield server


@pytest.fixture
def dev(rest: httpx.Client) -> dict[str, Any]:
    return new_device(rest, f"robust-{next(_names)}")


def _publish_and_check(client: PahoClient, rest: httpx.Client, device_id: str) -> None:
    """The well-behaved client still gets PUBACKs, and its data is stored."""
    ts = next(_ts)
    assert client.publish(TELEMETRY, {"ts": ts, "values": {"ok": ts}}, qos=1).value == 0
    assert points(rest, device_id, "ok")[-1] == {"ts": ts, "value": ts}
    assert not client.disconnects


def _oversized_header() -> bytes:
    return b"\x30\xff\xff\xff\x7f"  # PUBLISH declaring 268,435,455 bytes (the MQTT maximum)


BEFORE_CONNECT = {
    "garbage": b"\x00\x01garbage\xff\xff\xff\xff" * 4,
    "http-request": b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    "wrong-protocol-name": packet(0x10, b"\x00\x04MQTX\x04\x02\x00\x3c\x00\x01x"),
    "client-id-longer-than-packet": packet(0x10, b"\x00\x04MQTT\x04\x02\x00\x3c\x00\x50ab"),
    "reserved-connect-flag": packet(0x10, b"\x00\x04MQTT\x04\x03\x00\x3c\x00\x01x"),
    "oversized-connect": b"\x10\xff\xff\xff\x7f",
    "publish-before-connect": packet(0x30, b"\x00\x01ab"),
}


@pytest.mark.parametrize("data", BEFORE_CONNECT.values(), ids=BEFORE_CONNECT.keys())
def test_bad_bytes_before_connect_close_only_that_connection(
    srv: RunningServer, rest: httpx.Client, dev: dict[str, Any], data: bytes
) -> None:
    with device_client(srv.mqtt_port, dev["access_token"], V311) as good:
        _publish_and_check(good, rest, dev["id"])
        with raw_socket(srv.mqtt_port) as sock:
            sock.sendall(data)
            seen = read_until_closed(sock)
            # At most a refusing CONNACK, never an accepting one.
            assert all(first == 0x20 and body[-1] != 0 for first, body in seen), seen
        _publish_and_check(good, rest, dev["id"])


def _malformed_publish() -> bytes:
    # The topic length says 200 bytes, the packet has 3.
    return packet(0x32, b"\x00\xc8abc")


AFTER_CONNECT = {
    "malformed-publish": (_malformed_publish(), {MALFORMED_PACKET}),
    "publish-qos-3": (packet(0x36, b"\x00\x01a\x00\x01\x00x"), {MALFORMED_PACKET, 0x82}),
    "reserved-packet-type": (packet(0x00, b""), {MALFORMED_PACKET, 0x82}),
    "oversized-publish": (_oversized_header(), {PACKET_TOO_LARGE}),
    "garbage": (b"\xff" * 64, {MALFORMED_PACKET, 0x82}),
}


@pytest.mark.parametrize("version", [V311, V5], ids=["v311", "v5"])
@pytest.mark.parametrize(("data", "reasons"), AFTER_CONNECT.values(), ids=AFTER_CONNECT.keys())
def test_bad_packet_after_connect_ends_only_that_connection(
    srv: RunningServer,
    rest: httpx.Client,
    dev: dict[str, Any],
    version: int,
    data: bytes,
    reasons: set[int],
) -> None:
    with device_client(srv.mqtt_port, dev["access_token"], V5) as good:
        with raw_socket(srv.mqtt_port) as sock:
            login = connect_packet("", version=version, username=dev["access_token"])
            sock.sendall(login)
            connack = read_packet(sock)
            assert connack is not None
            assert connack[0] == 0x20
            assert connack[1][1] == 0, connack
            sock.sendall(data)
            seen = read_until_closed(sock)
        if version == V5:
            # v5: DISCONNECT with the reason first is expected, a bare close is allowed.
            assert len(seen) <= 1, seen
            for first, body in seen:
                assert first == 0xE0
                assert body[0] in reasons, f"DISCONNECT reason 0x{body[0]:02x}"
        else:
            assert seen == []
        _publish_and_check(good, rest, dev["id"])


def test_silent_clients_are_closed_by_the_connect_timeout(srv: RunningServer) -> None:
    """Nothing, or half a CONNECT, after the TCP handshake: closed (after ~10 s)."""
    with (
        raw_socket(srv.mqtt_port, timeout=30) as silent,
        raw_socket(srv.mqtt_port, timeout=30) as half,
    ):
        half.sendall(connect_packet("half")[:7])
        assert read_until_closed(silent) == []
        assert read_until_closed(half) == []


# -- kill -9 under MQTT load ------------------------------------------------------------------

PUBLISHERS = 4
MAX_MESSAGES = 5000
LOAD_S = 1.0


class _Publisher:
    """One paho v3.1.1 QoS 1 publisher; remembers the ts of every PUBACKed message."""

    def __init__(self, port: int, token: str, worker: int) -> None:
        self.client = PahoClient(port, token, version=V311)
        self.worker = worker
        self.ts_of_mid: dict[int, int] = {}
        self.acked_mids: list[int] = []  # appended on the network thread (on_publish)
        self.client.paho.on_publish = self._on_publish
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"publisher-{worker}", daemon=True)

    def _on_publish(self, client: Any, userdata: Any, mid: int, rc: Any, props: Any) -> None:
        self.acked_mids.append(mid)

    def _run(self) -> None:
        base = T0 + self.worker * MAX_MESSAGES
        for n in range(MAX_MESSAGES):
            if self.stop.is_set() or not self.client.paho.is_connected():
                return
            ts = base + n
            info = self.client.paho.publish(TELEMETRY, f'{{"ts":{ts},"values":{{"v":{ts}}}}}', 1)
            self.ts_of_mid[info.mid] = ts
            # Keep the queue short: publish about as fast as PUBACKs come back.
            for _ in range(200):
                if len(self.ts_of_mid) - len(self.acked_mids) < 50 or self.stop.is_set():
                    break
                time.sleep(0.001)

    def acked_ts(self) -> set[int]:
        return {self.ts_of_mid[mid] for mid in list(self.acked_mids) if mid in self.ts_of_mid}


def test_kill_9_under_mqtt_load_loses_no_pubacked_point(
    server: RunningServer, admin: httpx.Client, tmp_path: Path
) -> None:
    device = new_device(admin, "mqtt-crash")
    publishers = [
        _Publisher(server.mqtt_port, device["access_token"], w) for w in range(PUBLISHERS)
    ]
    acked: set[int] = set()
    try:
        for p in publishers:
            assert p.client.connect().value == 0
        for p in publishers:
            p.thread.start()
        deadline = time.monotonic() + LOAD_S
        while time.monotonic() < deadline and any(p.thread.is_alive() for p in publishers):
            time.sleep(0.05)
        server.kill9()
        for p in publishers:
            p.stop.set()
        for p in publishers:
            p.thread.join(30)
            assert not p.thread.is_alive()
        for p in publishers:
            p.client.wait_disconnected()
            acked |= p.acked_ts()
    finally:
        for p in publishers:
            p.stop.set()
        # Each close may wait ~1 s for paho's network thread: close them side by side.
        closers = [threading.Thread(target=p.client.close) for p in publishers]
        for t in closers:
            t.start()
        for t in closers:
            t.join(30)
    assert acked, "no message was PUBACKed before the crash"

    restarted = start_server(server.data_dir, tmp_path / "logs2")
    try:
        with restarted.admin() as rest:
            stored = {p["ts"] for p in points(rest, device["id"], "v")}
    finally:
        restarted.stop()
    assert_no_errors_logged(restarted)
    missing = acked - stored
    assert not missing, (
        f"{len(missing)} of {len(acked)} PUBACKed points lost: {sorted(missing)[:5]}"
    )
