"""`GET /api/v1/stats`: every service's counters, for operators and benchmarks (admin).

The same numbers become Prometheus metrics on `/metrics` with the observability work;
this JSON view needs no extra dependency and is what `iotmesh stats` prints.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from iotmesh.api.auth import require_admin
from iotmesh.api.context import ApiContext, MsgspecResponse, context

router = APIRouter(prefix="/api/v1", tags=["stats"], dependencies=[Depends(require_admin)])

EXAMPLE = {
    "mqtt": {"connections": 2, "messages_in": [0, 120, 0], "auth_failures": 1, "sessions": 2},
    "writer": {"commits": 40, "records": 360, "last_commit_ms": 1.9, "pending_records": 0},
    "bus": {"queued": 0},
    "pipeline": {"dropped": 0},
}


@router.get(
    "/stats",
    response_class=MsgspecResponse,
    responses={200: {"content": {"application/json": {"example": EXAMPLE}}}},
)
async def stats(ctx: Annotated[ApiContext, Depends(context)]) -> MsgspecResponse:
    """Counters and gauges of each service, by service name."""
    return MsgspecResponse(ctx.stats())
