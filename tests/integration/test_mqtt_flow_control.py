"""Flow control of incoming QoS 1/2 messages: `mqtt.receive_maximum` holds for every client.

A v3.1.1 client has no Receive Maximum: nothing stops it from writing thousands of QoS 1
PUBLISHes without waiting, and one socket read of the server's holds up to 256 KiB of
them. The server must still take at most `receive_maximum` of them at a time: the rest
wait as bytes (in the reader, then in the kernel) until acks free room. A v5 client
that sends more than the Receive Maximum it was granted breaks the protocol and gets
DISCONNECT 0x93 (a short burst over it is tolerated); one that keeps to it is never refused.

What is observed, never timed: the order of what the server writes back (a PINGREQ
behind a flood is answered only after the messages before it are acknowledged, but for
at most `receive_maximum`), and the `mqtt` counters of `GET /api/v1/stats`.
"""

from __future__ import annotations

import itertools
import json
import socket
import struct
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.integration.mqtt_helpers import (
    DISCONNECT,
    V5,
    V311,
    WAIT_S,
    connect_packet,
    module_server,
    new_device,
    points,
    publish_packet,
    raw_socket,
    read_packet,
    read_until_closed,
    wait_until,
)
from tests.integration.server import RunningServer

TELEMETRY = "v1/devices/me/telemetry"
RECEIVE_MAXIMUM = 16  # small, so that a flood is many times over it
FLOOD = 2000  # ~120 KB of QoS 1 PUBLISHes: most of it lands in one socket read
PINGREQ = b"\xc0\x00"
PUBACK, PINGRESP, CONNACK, SERVER_DISCONNECT = 0x40, 0xD0, 0x20, 0xE0
RECEIVE_MAXIMUM_EXCEEDED = 0x93
T0 = 1_720_000_000_000

_names = itertools.count()


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    env = {"IOTMESH_MQTT__RECEIVE_MAXIMUM": str(RECEIVE_MAXIMUM)}
    with module_server(tmp_path_factory, "mqtt-flow-control", env) as server:
        yield server


@pytest.fixture
def dev(rest: httpx.Client) -> dict[str, Any]:
    return new_device(rest, f"flow-{next(_names)}")


def _message(n: int, version: int = V311, packet_id: int | None = None, qos: int = 1) -> bytes:
    payload = json.dumps({"ts": T0 + n, "values": {"n": n}}).encode()
    pid = n % 60_000 + 1 if packet_id is None else packet_id
    return publish_packet(TELEMETRY, payload, version=version, qos=qos, packet_id=pid)


def _connect(sock: socket.socket, dev: dict[str, Any], version: int) -> None:
    sock.sendall(
        connect_packet(f"flow-{next(_names)}", version=version, username=dev["access_token"])
    )
    connack = read_packet(sock)
    assert connack is not None
    assert (connack[0], connack[1][1]) == (CONNACK, 0), connack


def _mqtt_stats(rest: httpx.Client) -> dict[str, Any]:
    stats: dict[str, Any] = rest.get("/api/v1/stats").json()["mqtt"]
    return stats


def _send_in_background(sock: socket.socket, data: bytes) -> threading.Thread:
    """Write `data` on a thread: the server reads it only as fast as it acks, and the
    test must read those acks meanwhile."""
    thread = threading.Thread(target=sock.sendall, args=(data,), name="flood", daemon=True)
    thread.start()
    return thread


def test_v311_flood_is_taken_receive_maximum_at_a_time(
    srv: RunningServer, rest: httpx.Client, dev: dict[str, Any]
) -> None:
    ping_after = FLOOD // 2  # a PINGREQ behind the first half of the flood
    flood = b"".join(_message(n) for n in range(ping_after))
    flood += PINGREQ + b"".join(_message(n) for n in range(ping_after, FLOOD))
    with raw_socket(srv.mqtt_port) as sock:
        _connect(sock, dev, V311)
        sender = _send_in_background(sock, flood)
        acked: list[int] = []
        acked_before_pingresp = None
        for _ in range(FLOOD + 1):  # every PUBACK and the PINGRESP, in the order sent
            packet = read_packet(sock)
            assert packet is not None, f"closed after {len(acked)} PUBACKs"
            kind, body = packet
            if kind == PINGRESP:
                acked_before_pingresp = len(acked)
            else:
                assert kind == PUBACK, packet
                acked.append(struct.unpack("!H", body[:2])[0])
        sender.join(WAIT_S)
        assert not sender.is_alive()
        sock.sendall(DISCONNECT)

    assert acked == [n % 60_000 + 1 for n in range(FLOOD)]  # all, in order
    # The PINGREQ was handled only after the messages before it, and only once at most
    # RECEIVE_MAXIMUM - 1 of them were unacknowledged (answers leave in handling order).
    assert acked_before_pingresp is not None
    assert acked_before_pingresp >= ping_after - (RECEIVE_MAXIMUM - 1), acked_before_pingresp
    stats = _mqtt_stats(rest)
    assert stats["incoming_unacked_peak"] <= RECEIVE_MAXIMUM, stats
    assert stats["protocol_errors"] == 0
    stored = points(rest, dev["id"], "n")
    assert stored == [{"ts": T0 + n, "value": n} for n in range(FLOOD)]


def test_v311_flood_then_disconnect_stores_every_message(
    srv: RunningServer, rest: httpx.Client, dev: dict[str, Any]
) -> None:
    """Held packets are handled in order even when the client never reads its acks:
    the DISCONNECT at the end comes after every message before it is handled."""
    with raw_socket(srv.mqtt_port) as sock:
        _connect(sock, dev, V311)
        sender = _send_in_background(sock, b"".join(_message(n) for n in range(FLOOD)) + DISCONNECT)
        sender.join(WAIT_S)
        assert not sender.is_alive()
        seen = read_until_closed(sock, max_packets=FLOOD + 1)
    assert [kind for kind, _ in seen] == [PUBACK] * len(seen)
    wait_until(lambda: len(points(rest, dev["id"], "n")) == FLOOD, f"{FLOOD} points stored")
    assert _mqtt_stats(rest)["incoming_unacked_peak"] <= RECEIVE_MAXIMUM


def test_v5_client_far_over_the_receive_maximum_gets_0x93(
    srv: RunningServer, rest: httpx.Client, dev: dict[str, Any]
) -> None:
    """One write: twice RECEIVE_MAXIMUM + 1 QoS 1 messages, none acknowledged yet (acks
    wait for a commit, and all these are handled in one go)."""
    errors_before = _mqtt_stats(rest)["protocol_errors"]
    count = 2 * RECEIVE_MAXIMUM + 1
    with raw_socket(srv.mqtt_port) as sock:
        _connect(sock, dev, V5)
        sock.sendall(b"".join(_message(n, V5) for n in range(count)))
        seen = read_until_closed(sock, max_packets=count + 1)
    disconnects = [body for kind, body in seen if kind == SERVER_DISCONNECT]
    assert disconnects, seen
    assert disconnects[0][0] == RECEIVE_MAXIMUM_EXCEEDED, seen
    assert _mqtt_stats(rest)["protocol_errors"] == errors_before + 1


def test_v5_client_keeping_qos2_messages_open_past_the_limit_gets_0x93(
    srv: RunningServer, rest: httpx.Client, dev: dict[str, Any]
) -> None:
    """QoS 2 messages stay open until the client's PUBREL, however fast the server is:
    RECEIVE_MAXIMUM + 1 of them without a PUBREL break the limit (Paho's
    test_flow_control2)."""
    with raw_socket(srv.mqtt_port) as sock:
        _connect(sock, dev, V5)
        count = RECEIVE_MAXIMUM + 1
        sock.sendall(b"".join(_message(n, V5, qos=2) for n in range(count)))
        seen = read_until_closed(sock, max_packets=count + 1)
    disconnects = [body for kind, body in seen if kind == SERVER_DISCONNECT]
    assert disconnects, seen
    assert disconnects[0][0] == RECEIVE_MAXIMUM_EXCEEDED, seen


def test_v5_burst_a_little_over_the_receive_maximum_is_tolerated(
    srv: RunningServer, rest: httpx.Client, dev: dict[str, Any]
) -> None:
    """As the Paho interoperability client does: a few messages past the limit at once.
    The server could refuse them (0x93); it acks them all once they are stored."""
    count = RECEIVE_MAXIMUM + 2
    with raw_socket(srv.mqtt_port) as sock:
        _connect(sock, dev, V5)
        sock.sendall(b"".join(_message(n, V5) for n in range(count)))
        seen = [read_packet(sock) for _ in range(count)]
    assert [p[0] if p else None for p in seen] == [PUBACK] * count


def test_v5_client_keeping_to_the_receive_maximum_is_never_refused(
    srv: RunningServer, rest: httpx.Client, dev: dict[str, Any]
) -> None:
    """The tightest legal client: the next message leaves the moment a PUBACK arrives,
    so the server always has RECEIVE_MAXIMUM unacknowledged messages."""
    total = 20 * RECEIVE_MAXIMUM
    with raw_socket(srv.mqtt_port) as sock:
        _connect(sock, dev, V5)
        sock.sendall(b"".join(_message(n, V5) for n in range(RECEIVE_MAXIMUM)))
        sent = RECEIVE_MAXIMUM
        for acked in range(total):
            packet = read_packet(sock)
            assert packet is not None, f"closed after {acked} PUBACKs"
            kind, body = packet
            assert kind == PUBACK, packet
            assert struct.unpack("!H", body[:2])[0] == acked % 60_000 + 1
            assert len(body) == 2 or body[2] == 0, body  # v5: reason code success
            if sent < total:
                sock.sendall(_message(sent, V5))
                sent += 1
        sock.sendall(DISCONNECT)
    assert len(points(rest, dev["id"], "n")) == total


def test_pipelined_after_connect_and_interleaved_packets_keep_their_order(
    srv: RunningServer, rest: httpx.Client, dev: dict[str, Any]
) -> None:
    """CONNECT, a flood and PINGREQs in one write: what follows CONNECT waits in the
    reader while the login runs, then goes on in order under the same limit."""
    parts = [connect_packet(f"flow-{next(_names)}", username=dev["access_token"])]
    for n in range(200):
        parts.append(_message(n))
        if n % 50 == 49:
            parts.append(PINGREQ)
    with raw_socket(srv.mqtt_port) as sock:
        sock.sendall(b"".join(parts))
        kinds = []
        for _ in range(1 + 200 + 4):
            packet = read_packet(sock)
            assert packet is not None
            kinds.append(packet[0])
        sock.sendall(DISCONNECT)
    assert kinds[0] == CONNACK
    pings = [i for i, kind in enumerate(kinds) if kind == PINGRESP]
    assert len(pings) == 4
    for k, at in enumerate(pings):  # at least the messages before it, but the last 15
        assert kinds[1:at].count(PUBACK) >= 50 * (k + 1) - (RECEIVE_MAXIMUM - 1), kinds
    assert len(points(rest, dev["id"], "n")) == 200
