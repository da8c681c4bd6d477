"""bind_udp: the CoAP socket is ours, dual-stack, and a busy port is a clear error."""

from __future__ import annotations

import socket

import pytest

from iotmesh.core.errors import StartupError
from iotmesh.transports.coap.server import bind_udp


def test_binds_ipv4_loopback_on_a_free_port() -> None:
    sock = bind_udp("127.0.0.1", 0, "coap")
    try:
        host, port = sock.getsockname()[:2]
        assert host == "::ffff:127.0.0.1"
        assert port > 0
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.sendto(b"ping", ("127.0.0.1", port))
            sock.setblocking(True)
            sock.settimeout(5)
            assert sock.recvfrom(16)[0] == b"ping"
    finally:
        sock.close()


def test_busy_port_is_a_startup_error() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        busy.bind(("127.0.0.1", 0))
        port = busy.getsockname()[1]
        with pytest.raises(StartupError, match=f"coap port {port} on 127.0.0.1 is already in use"):
            bind_udp("127.0.0.1", port, "coap")


def test_unresolvable_host() -> None:
    with pytest.raises(StartupError, match="cannot resolve"):
        bind_udp("no-such-host.invalid", 0, "coap")
