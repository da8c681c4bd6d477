"""`bind_tcp`: the receive buffer set on the listening socket is what accepted ones get."""

from __future__ import annotations

import socket
import sys

import pytest

from iotmesh.transports.sockets import bind_tcp


def _rcvbuf(sock: socket.socket) -> int:
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)


def _accepted(listener: socket.socket) -> tuple[socket.socket, socket.socket]:
    client = socket.create_connection(listener.getsockname()[:2], timeout=5)
    listener.setblocking(True)
    listener.settimeout(5)
    server_side, _ = listener.accept()
    return client, server_side


@pytest.mark.skipif(sys.platform != "linux", reason="Linux's SO_RCVBUF arithmetic")
def test_accepted_sockets_inherit_the_receive_buffer() -> None:
    listener = bind_tcp("127.0.0.1", 0, "test", receive_buffer=65536)
    try:
        assert _rcvbuf(listener) == 2 * 65536  # Linux doubles it (bookkeeping)
        client, server_side = _accepted(listener)
        with client, server_side:
            assert _rcvbuf(server_side) == 2 * 65536
    finally:
        listener.close()


def test_zero_leaves_the_kernel_default() -> None:
    default = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener = bind_tcp("127.0.0.1", 0, "test", receive_buffer=0)
    try:
        assert _rcvbuf(listener) == _rcvbuf(default)
    finally:
        listener.close()
        default.close()
