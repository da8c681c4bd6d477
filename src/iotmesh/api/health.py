"""`/healthz`: 200 when every service is ready, 503 naming the ones that are not."""

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
    """Readiness of the process and of each of its services (no auth)."""
    services = ctx.health()
    ok = all(h.ok for h in services.values())
    body = {
        "status": "ok" if ok else "degraded",
        "services": {name: {"ok": h.ok, "detail": h.detail} for name, h in services.items()},
    }
    return MsgspecResponse(body, status_code=200 if ok else 503)
