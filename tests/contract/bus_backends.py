"""How the bus contract suite builds each bus implementation.

`BusHarness.bus()` gives the test a started bus: for the in-process bus always the
same one (it has no members but itself); for an engine a new connection each call,
i.e. a new group member, as a separate process would be. Every test gets its own
namespace (streams, consumers, keys), deleted afterwards, so parallel runs and
leftovers of killed runs do not meet.
"""

from __future__ import annotations

import socket
import uuid
from dataclasses import dataclass
from typing import Any

import pytest

from iotmesh.bus import make_bus
from iotmesh.bus.interface import Bus
from iotmesh.core.settings import BusSettings

NATS_URL = "nats://127.0.0.1:4222"
REDIS_URL = "redis://127.0.0.1:6379/15"

# Small numbers, so a test exercises batches, partitions and limits with few messages;
# a short ack wait, so a dead member's partitions move within a second.
DEFAULTS: dict[str, Any] = {
    "partitions": 4,
    "partition_queue": 64,
    "max_batch": 4,
    "max_deliver": 3,
    "ack_wait_s": 1.0,
    "dedup_window_s": 60.0,
    "request_timeout_s": 5.0,
    "nats_url": NATS_URL,
    "redis_url": REDIS_URL,
}


@dataclass(frozen=True)
class Backend:
    """One bus implementation: its settings name and whether it stores messages."""

    name: str
    durable: bool
    port: int = 0


BACKENDS = [
    Backend("memory", durable=False),
    Backend("nats", durable=True, port=4222),
    Backend("redis", durable=True, port=6379),
]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


class BusHarness:
    """Buses of one backend for one test; `close` stops them and deletes their data."""

    def __init__(self, backend: Backend, **overrides: Any) -> None:
        if backend.port and not _listening(backend.port):
            pytest.fail(
                f"{backend.name} is not listening on 127.0.0.1:{backend.port};"
                " scripts/test starts it (nats-server -js, redis-server)"
            )
        self.backend = backend
        values = {**DEFAULTS, **overrides}
        values["backend"] = backend.name
        values.setdefault("namespace", f"t{uuid.uuid4().hex[:10]}")
        self.settings = BusSettings(**values)
        self._buses: list[Bus] = []

    @property
    def durable(self) -> bool:
        return self.backend.durable

    async def bus(self) -> Bus:
        """A started bus: the one in-process bus, or a new member of an engine."""
        if self._buses and not self.durable:
            return self._buses[0]
        bus = make_bus(self.settings)
        await bus.start()
        self._buses.append(bus)
        return bus

    async def close(self) -> None:
        buses, self._buses = self._buses, []
        for bus in buses:
            await bus.stop()
        if self.durable:
            cleaner: Any = make_bus(self.settings)
            await cleaner.start()
            try:
                await cleaner.delete_everything()
            finally:
                await cleaner.stop()
