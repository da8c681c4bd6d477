"""What a served process says about itself, and the seam a service registry plugs into.

Every `iotmesh serve` process builds one `InstanceInfo` once it listens and hands it to
a `Registrar`: an async context manager factory entered for the life of the process.
`iotmesh serve` uses the cluster registry (`serve/registration.py`: TTL heartbeats,
`iotmesh services`); `no_registry` registers nothing (unit tests). The run-info file in
the data dir is how tests and the CLI find a process on one machine either way.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager

import msgspec

from iotmesh import __version__
from iotmesh.core.clock import now_ms


class InstanceInfo(msgspec.Struct, frozen=True):
    """One running instance of one service."""

    service: str
    instance_id: str
    addresses: dict[str, str]
    """What it serves where: `health` (an http:// URL) always, `http`, `mqtt`, `coap`
    (host:port)."""
    version: str = __version__
    pid: int = msgspec.field(default_factory=os.getpid)
    host: str = msgspec.field(default_factory=socket.gethostname)
    started_ms: int = msgspec.field(default_factory=now_ms)


Registrar = Callable[[InstanceInfo], AbstractAsyncContextManager[None]]


@contextlib.asynccontextmanager
async def no_registry(info: InstanceInfo) -> AsyncIterator[None]:
    """A registrar that registers nothing."""
    yield


def default_instance_id() -> str:
    """`<host name>-<pid>`: unique on a machine, readable in `iotmesh services`."""
    host = "".join(c if c.isalnum() or c in "-_" else "-" for c in socket.gethostname())
    return f"{host}-{os.getpid()}"
