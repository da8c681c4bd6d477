"""The cluster registry as the `Registrar` of `iotmesh serve`: every served process
registers itself, so `iotmesh services` and `cluster.Discovery` find it.

Always on in serve: a served process needs NATS or Redis for its bus anyway, so the
registry costs no new engine. The engine is `cluster.backend` when the settings name
one; left unset, it is the bus's engine (`cluster.backend.cluster_engine`), so a
NATS-only or Redis-only deployment needs no second server, and `iotmesh services` with
the same settings reads the same engine. Urls default to the bus's.

The record: service = the role, instance id = `serve.instance_id` (or `<host>-<pid>`),
version, addresses as URLs (`http://` first: `cluster.http.ServiceHttp` calls the
first; then `mqtt://`, `coap://`), metadata host, pid and health URL; health
"ok", "degraded" while a service reports unhealthy, "draining" once stopping.

Error handling: an unreachable engine fails start-up (the first heartbeat is written in
`Registration.start`), like an unreachable bus does; later heartbeat failures are
logged and retried by `Registration`.
Resource handling: one engine connection per process, for the life of the process;
leaving the context deregisters (best effort: the TTL removes the record anyway), then
closes the connection.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable

from iotmesh.cluster import Registration, make_backend
from iotmesh.core.settings import Settings
from iotmesh.serve.instance import InstanceInfo, Registrar

SCHEMES = {"http": "http://", "health": "http://", "mqtt": "mqtt://", "coap": "coap://"}


def addresses(info: InstanceInfo) -> list[str]:
    """The record's addresses: URLs, the HTTP API (or the health listener) first."""
    order = ["http", "health", "mqtt", "coap"]
    names = sorted(info.addresses, key=lambda n: order.index(n) if n in order else len(order))
    if "http" in info.addresses:
        names.remove("health")  # the same URL
    out = []
    for name in names:
        address = info.addresses[name]
        scheme = SCHEMES.get(name, "")
        out.append(address if "://" in address else scheme + address)
    return out


def cluster_registrar(settings: Settings, health: Callable[[], str] | None = None) -> Registrar:
    """A `Registrar` that keeps the instance in the cluster registry while it runs.

    `health`: "ok", "degraded" or "draining", read at each heartbeat."""

    @contextlib.asynccontextmanager
    async def register(info: InstanceInfo) -> AsyncIterator[None]:
        backend = make_backend(settings)
        registration = Registration(
            backend,
            info.service,
            interval_s=settings.cluster.heartbeat_interval_s,
            addresses=addresses(info),
            version=info.version,
            instance_id=info.instance_id,
            metadata={
                "host": info.host,
                "pid": str(info.pid),
                "health_url": info.addresses["health"],
            },
            health=health,
        )
        async with backend, registration:
            yield

    return register
