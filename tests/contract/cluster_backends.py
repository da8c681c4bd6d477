"""How the cluster contract suite builds each engine backend.

Every test gets its own namespace (keys, buckets, Lease objects), deleted afterwards,
so parallel runs and leftovers of killed runs do not meet. Small TTLs so expiry is
seen in a second or two.

Redis and NATS are the real servers on loopback; Kubernetes is a FAKE API server
(tests/k8s_fake.py), because no Kubernetes cluster can run on this machine.
"""

from __future__ import annotations

import socket
import uuid
from typing import Any

import pytest

from iotmesh.cluster import ClusterBackend, make_backend
from iotmesh.core.settings import BusSettings, ClusterSettings, Settings
from tests.k8s_fake import FakeApiServer

NATS_URL = "nats://127.0.0.1:4222"
REDIS_URL = "redis://127.0.0.1:6379/15"
PORTS = {"nats": 4222, "redis": 6379}
ENGINES = ["redis", "nats", "kubernetes"]

DEFAULTS: dict[str, Any] = {
    "heartbeat_interval_s": 0.2,
    "ttl_s": 1.0,
    "lease_s": 1.0,
}


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def engine_settings(request: pytest.FixtureRequest, backend: str) -> dict[str, Any]:
    """`ClusterSettings` values that point `backend` at its server: for kubernetes,
    the session's fake API server (fixture `fake_kubernetes`); nothing for the others."""
    if backend != "kubernetes":
        return {}
    fake: FakeApiServer = request.getfixturevalue("fake_kubernetes")
    return fake.cluster_settings()


def cluster_settings(backend: str, **overrides: Any) -> Settings:
    """Settings for `backend` with a fresh namespace (unless given); a kubernetes
    backend needs `engine_settings` among the overrides."""
    if backend in PORTS and not _listening(PORTS[backend]):
        pytest.fail(
            f"{backend} is not listening on 127.0.0.1:{PORTS[backend]};"
            " scripts/test starts it (nats-server -js, redis-server)"
        )
    values = {**DEFAULTS, **overrides, "backend": backend}
    values.setdefault("namespace", f"t{uuid.uuid4().hex[:10]}")
    return Settings(
        cluster=ClusterSettings(**values),
        bus=BusSettings(nats_url=NATS_URL, redis_url=REDIS_URL),
    )


class ClusterHarness:
    """Started backends on one engine and namespace; `close` stops them and deletes data."""

    def __init__(self, backend: str, **overrides: Any) -> None:
        self.settings = cluster_settings(backend, **overrides)
        self._made: list[ClusterBackend] = []

    async def backend(self) -> ClusterBackend:
        """A new connection (as another process would have)."""
        b = make_backend(self.settings)
        await b.start()
        self._made.append(b)
        return b

    async def close(self) -> None:
        made, self._made = self._made, []
        for b in made:
            await b.stop()
        cleaner = make_backend(self.settings)
        await cleaner.start()
        try:
            await cleaner.delete_everything()
        finally:
            await cleaner.stop()
