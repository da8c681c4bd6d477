"""The small HTTP app of a served process without the REST API: /healthz, /readyz,
/livez, /info, /stats, /metrics.

The probes answer as the REST API's do (api/health.py), so one Kubernetes probe
definition fits every role, and `/metrics` is the REST API's (`api.metrics.collect`:
the role's services, process metrics, build info, `iotmesh_leader{job}`), so one
Prometheus scrape configuration fits every role too. No auth: bind it to a private
address (`serve.health_port`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import msgspec
from fastapi import FastAPI, Response

from iotmesh.api.metrics import collect
from iotmesh.api.prometheus import CONTENT_TYPE
from iotmesh.core.ids import SERVICE_NAME
from iotmesh.core.lifecycle import Health, Service
from iotmesh.serve.instance import InstanceInfo


def _json(body: object, status: int = 200) -> Response:
    return Response(msgspec.json.encode(body), status, media_type="application/json")


def create_health_app(
    health: Callable[[], dict[str, Health]],
    info: Callable[[], InstanceInfo | None],
    stats: Callable[[], dict[str, dict[str, Any]]],
    not_ready: Callable[[], list[str]] = lambda: [],
    services: Sequence[Service] = (),
    service: str = SERVICE_NAME,
) -> FastAPI:
    """`/healthz` as the REST API answers it (200 or 503 naming the services), `/readyz`
    (200, or 503 with `not_ready`'s reasons), `/livez`, `/info`: the instance's
    `InstanceInfo`, `/stats`: its services' counters (as `GET /api/v1/stats` of the
    http service; no auth: bind it to a private address), `/metrics`: `services` (read
    at each scrape) in the Prometheus text format, `service` naming the process."""
    app = FastAPI(title="iotmesh service", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/healthz")
    async def healthz() -> Response:
        services = health()
        ok = all(h.ok for h in services.values())
        body = {
            "status": "ok" if ok else "degraded",
            "services": {name: {"ok": h.ok, "detail": h.detail} for name, h in services.items()},
        }
        return _json(body, 200 if ok else 503)

    @app.get("/readyz")
    async def readyz() -> Response:
        reasons = not_ready()
        if reasons:
            return _json({"status": "not ready", "reasons": reasons}, 503)
        return _json({"status": "ready"})

    @app.get("/livez")
    async def livez() -> Response:
        return _json({"status": "alive"})

    @app.get("/info")
    async def instance_info() -> Response:
        found = info()
        return _json(found) if found is not None else _json({"status": "starting"}, 503)

    @app.get("/stats")
    async def counters() -> Response:
        return _json(stats())

    @app.get("/metrics")
    async def metrics() -> Response:
        registry = collect(services, not not_ready(), service)
        return Response(registry.render(), media_type=CONTENT_TYPE)

    return app
