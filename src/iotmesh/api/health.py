"""Probes: `/livez` (alive), `/readyz` (send me traffic), `/healthz` (each service's state).

Three questions, three endpoints, none needing credentials:

- `/livez`: the process answers HTTP. Always 200 while it serves; for a liveness probe
  (restart when it fails). It never looks at a backend: InfluxDB being down is no
  reason to restart iotmesh.
- `/readyz`: ready to take device traffic: every service started and healthy, and no
  shutdown under way. 503 with the reasons otherwise; for a readiness probe or a load
  balancer.
- `/healthz`: each service's own health and detail (connections, records pending,
  "commits failing for 12s"); 200 when all are healthy, 503 naming the ones that are
  not. For people and monitoring, and what `iotmesh run`'s start-up waits for.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from iotmesh.api.context import ApiContext, MsgspecResponse, context

router = APIRouter(tags=["health"])


@router.get(
    "/healthz",
    response_class=MsgspecResponse,
    responses={200: {"content": {"application/json": {"example": {"status": "ok"}}}}},
)
async def healthz(ctx: Annotated[ApiContext, Depends(context)]) -> MsgspecResponse:
    """Health of each service of the process (no auth); 503 when one is not healthy."""
    services = ctx.health()
    ok = all(h.ok for h in services.values())
    body = {
        "status": "ok" if ok else "degraded",
        "services": {name: {"ok": h.ok, "detail": h.detail} for name, h in services.items()},
    }
    return MsgspecResponse(body, status_code=200 if ok else 503)


@router.get(
    "/readyz",
    response_class=MsgspecResponse,
    responses={
        200: {"content": {"application/json": {"example": {"status": "ready"}}}},
        503: {
            "content": {
                "application/json": {
                    "example": {"status": "not ready", "reasons": ["shutting down"]}
                }
            }
        },
    },
)
async def readyz(ctx: Annotated[ApiContext, Depends(context)]) -> MsgspecResponse:
    """Whether the process takes traffic now (no auth): 503 with the reasons if not."""
    reasons = ctx.ready()
    if reasons:
        return MsgspecResponse({"status": "not ready", "reasons": reasons}, status_code=503)
    return MsgspecResponse({"status": "ready"})


@router.get(
    "/livez",
    response_class=MsgspecResponse,
    responses={200: {"content": {"application/json": {"example": {"status": "alive"}}}}},
)
async def livez() -> MsgspecResponse:
    """The process is alive and serving (no auth); never depends on a backend."""
    return MsgspecResponse({"status": "alive"})
