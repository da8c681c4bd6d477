"""The CoAP server as a service: a busy port, overload (5.03 with Max-Age, nothing
acknowledged lost), observations that end when their client goes away, shutdown."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from aiocoap import Message
from aiocoap.numbers.codes import Code

from iotmesh.proto import coap_wire
from iotmesh.proto.coap_wire import ACK, CHANGED, CON, NON, POST
from tests.integration.coap_helpers import (
    aiocoap_client,
    coap_url,
    libcoap,
    request,
    requires_libcoap,
)
from tests.integration.mqtt_helpers import new_device, points, set_shared, wait_until
from tests.integration.server import RunningServer, child_env, iotmesh_command, start_server


def test_busy_coap_port_fails_startup_in_one_line(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.1", 0))
        port = busy.getsockname()[1]
        result = subprocess.run(
            iotmesh_command(
                "run",
                "--data-dir",
                str(tmp_path / "d"),
                "--http-port",
                "0",
                "--mqtt-port",
                "0",
                "--coap-port",
                str(port),
            ),
            capture_output=True,
            text=True,
            timeout=60,
            env=child_env(),
            cwd=tmp_path,
            check=False,
        )
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"iotmesh: cannot start: coap port {port} on 127.0.0.1 is already in use"]


def test_coap_can_be_disabled(data_dir: Path, tmp_path: Path) -> None:
    server = start_server(data_dir, tmp_path / "logs", env={"IOTMESH_COAP__ENABLED": "false"})
    try:
        assert server.coap_port is None
    finally:
        assert server.stop() == 0


def _stats(server: RunningServer) -> dict[str, Any]:
    with server.admin() as admin:
        coap: dict[str, Any] = admin.get("/api/v1/stats").json()["coap"]
    return coap


@pytest.mark.slow
def test_overload_answers_503_with_max_age_and_loses_nothing(
    data_dir: Path, tmp_path: Path
) -> None:
    slow = {
        "IOTMESH_WRITER__DELAY_MS": "150",
        "IOTMESH_WRITER__MAX_PENDING_RECORDS": "100",
        "IOTMESH_BUS__PARTITIONS": "1",
        "IOTMESH_BUS__PARTITION_QUEUE": "4",
        "IOTMESH_BUS__MAX_BATCH": "4",
        "IOTMESH_COAP__ENQUEUE_TIMEOUT_S": "0.3",
    }
    server = start_server(data_dir, tmp_path / "logs", env=slow)
    try:
        with server.admin() as admin:
            device = new_device(admin, "coap-overload")
        token = device["access_token"]
        acked: list[int] = []
        codes: list[Code] = []

        async def one_client(first: int, count: int) -> None:
            # One context (one UDP socket) per client: aiocoap sends one request at a
            # time to a server (NSTART 1), so the load comes from many clients.
            async with aiocoap_client() as ctx:
                for n in range(first, first + count):
                    payload = f'{{"ts": {1_700_000_000_000 + n}, "values": {{"v": {n}}}}}'
                    r = await request(
                        ctx, server, token, "telemetry", payload=payload.encode(), timeout=60
                    )
                    codes.append(r.code)
                    if r.code == Code.CHANGED:
                        acked.append(n)
                    else:
                        assert r.code == Code.SERVICE_UNAVAILABLE, r
                        assert r.opt.max_age >= 1

        async def burst() -> None:
            await asyncio.gather(*(one_client(c * 5, 5) for c in range(40)))

        asyncio.run(burst())
        assert Code.SERVICE_UNAVAILABLE in codes, "the overloaded server never pushed back"
        assert Code.CHANGED in codes
        with server.admin() as admin:
            stored = {p["ts"] - 1_700_000_000_000 for p in points(admin, device["id"], "v")}
        assert set(acked) <= stored
        assert _stats(server)["overloaded"] > 0
        with server.anonymous() as client:
            assert client.get("/healthz").status_code == 200
    finally:
        server.stop()


def test_observation_ends_when_its_client_is_gone(server: RunningServer) -> None:
    with server.admin() as admin:
        device = new_device(admin, "coap-leaver")
    token = device["access_token"]

    async def observe_and_vanish() -> None:
        # aiocoap's client closes its socket at shutdown without deregistering.
        async with aiocoap_client() as ctx:
            message = Message(code=Code.GET, uri=coap_url(server, token, "attributes"), observe=0)
            observation = ctx.request(message)
            first = await asyncio.wait_for(observation.response, 20)
            assert first.code == Code.CONTENT

    asyncio.run(observe_and_vanish())
    assert _stats(server)["observations"] == 1
    with server.admin() as admin:
        # The next notification (CON) finds no one: ICMP port unreachable or no ACK.
        set_shared(admin, device["id"], {"x": 1})
    wait_until(lambda: _stats(server)["observations"] == 0, "the observation to end", 120)


def test_shutdown_with_observations_held(server: RunningServer, tmp_path: Path) -> None:
    with server.admin() as admin:
        device = new_device(admin, "coap-holder")
    url = coap_url(server, device["access_token"], "rpc")
    with (tmp_path / "obs.log").open("wb") as out:
        proc = subprocess.Popen(["coap-client-notls", "-m", "get", "-s", "30", url], stdout=out)
    try:
        wait_until(lambda: _stats(server)["observations"] == 1, "the observation")
        started = time.monotonic()
        assert server.stop() == 0
        assert time.monotonic() - started < 15
        assert "stopped" in server.output()
    finally:
        proc.kill()
        proc.wait(5)


def test_retransmissions_are_answered_and_stored_once(server: RunningServer) -> None:
    """A CON sent twice with one message id (a lost ACK) is stored once and answered
    twice; NON gets a NON 2.04. Raw datagrams, to control the message ids."""
    with server.admin() as admin:
        device = new_device(admin, "coap-retransmit")
    path = [(11, b"api"), (11, b"v1"), (11, device["access_token"].encode()), (11, b"telemetry")]

    def exchange(sock: socket.socket, data: bytes) -> coap_wire.Datagram:
        # Points without "ts" get the arrival millisecond: a pause keeps two uploads (or
        # a retransmission stored twice by mistake) from sharing one, which would hide it.
        time.sleep(0.005)
        sock.send(data)
        return coap_wire.decode(sock.recv(2048))

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(10)
        sock.connect(("127.0.0.1", server.coap_port))
        # The first request authenticates (aiocoap's path), the later ones take the
        # fast path: the token is in the login cache then.
        for mid, value in ((100, 1), (101, 2)):
            request = coap_wire.encode(CON, POST, mid, b"tk", path, b'{"d": %d}' % value)
            for _ in range(2):  # the original and a retransmission
                answer = exchange(sock, request)
                assert (answer.mtype, answer.code, answer.mid, answer.token) == (
                    ACK, CHANGED, mid, b"tk"
                )  # fmt: skip
        answer = exchange(sock, coap_wire.encode(NON, POST, 102, b"nn", path, b'{"d": 3}'))
        assert (answer.mtype, answer.code, answer.token) == (NON, CHANGED, b"nn")
    with server.admin() as admin:
        assert [p["value"] for p in points(admin, device["id"], "d")] == [1, 2, 3]
    assert _stats(server)["telemetry_fast_path"] >= 2


@requires_libcoap
def test_deregistration_ends_observations(server: RunningServer) -> None:
    """coap-client deregisters (GET with Observe 1) when its -s time is up: each
    observation ends at once, and the deregistering GET gets a normal answer."""
    with server.admin() as admin:
        device = new_device(admin, "coap-deregister")
        set_shared(admin, device["id"], {"mode": "eco"})
    for path in ("rpc", "attributes/updates", "attributes"):
        result = libcoap("-m", "get", "-s", "1", coap_url(server, device["access_token"], path))
        assert result.error_code is None, (path, result.stderr)
        assert _stats(server)["observations"] == 0, path
    assert _stats(server)["errors"] == 0


def test_blockwise_uploads_in_reassembly_are_bounded(data_dir: Path, tmp_path: Path) -> None:
    """Unfinished Block1 uploads hold memory for 93 s: beyond the limit a new one gets
    5.03 with Max-Age, and plain requests are still served."""
    env = {"IOTMESH_COAP__MAX_BLOCKWISE_UPLOADS": "2"}
    server = start_server(data_dir, tmp_path / "logs", env=env)
    try:
        with server.admin() as admin:
            device = new_device(admin, "coap-blocks")
        token = device["access_token"].encode()
        path = [(11, b"api"), (11, b"v1"), (11, token), (11, b"telemetry")]
        first_block = [*path, (coap_wire.BLOCK1, bytes([0x0A]))]  # block 0, more, 64 bytes
        answers = []
        sockets = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(3)]
        try:
            for n, sock in enumerate(sockets):  # three clients, one upload each
                sock.settimeout(10)
                sock.connect(("127.0.0.1", server.coap_port))
                sock.send(coap_wire.encode(CON, POST, 200 + n, b"b", first_block, b"[" * 64))
                answers.append(coap_wire.decode(sock.recv(2048)))
            assert [a.code for a in answers] == [0x5F, 0x5F, 0xA3]  # 2.31, 2.31, 5.03
            assert (coap_wire.MAX_AGE, b"\x0a") in answers[2].options
            plain = coap_wire.encode(CON, POST, 300, b"p", path, b'{"still": 1}')
            sockets[2].send(plain)
            assert coap_wire.decode(sockets[2].recv(2048)).code == CHANGED
        finally:
            for sock in sockets:
                sock.close()
    finally:
        server.stop()
