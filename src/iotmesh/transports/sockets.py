"""Binding listening sockets with errors a user can act on."""

from __future__ import annotations

import errno
import socket

from iotmesh.core.errors import StartupError


def bind_tcp(
    host: str, port: int, what: str, backlog: int = 1024, *, receive_buffer: int = 0
) -> socket.socket:
    """Bind and listen on a TCP socket, or raise `StartupError` saying why not.

    Binding before any server starts lets `iotmesh run` fail fast with one clear line
    ("http port 8080 on 127.0.0.1 is already in use") instead of a traceback.

    `receive_buffer` > 0 sets SO_RCVBUF (bytes; Linux doubles it for its bookkeeping and
    caps it at net.core.rmem_max), which turns receive autotuning off. It is set before
    `listen`, as tcp(7) asks (the window scale is agreed in the handshake); accepted
    sockets inherit it, so it costs no call per connection.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartupError(f"{what}: cannot resolve host {host!r}: {exc.strerror}") from exc
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if receive_buffer:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.bind(address)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise bind_failed(exc, what, host, port) from exc
    sock.setblocking(False)
    return sock


def bind_failed(exc: OSError, what: str, host: str, port: int) -> StartupError:
    """The start-up error for a socket `what` that could not be bound on host:port."""
    if exc.errno == errno.EADDRINUSE:
        return StartupError(f"{what} port {port} on {host} is already in use")
    if exc.errno == errno.EACCES:
        return StartupError(f"{what} port {port} on {host}: permission denied")
    return StartupError(f"{what}: cannot bind {host}:{port}: {exc.strerror}")
