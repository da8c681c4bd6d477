"""REST: server-side RPC to a device (admin only)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field

from iotmesh.api.auth import require_admin
from iotmesh.api.context import ApiContext, MsgspecResponse, context
from iotmesh.commands.rpc import MAX_TIMEOUT_MS

router = APIRouter(
    prefix="/api/v1/devices/{device_id}/rpc", tags=["rpc"], dependencies=[Depends(require_admin)]
)

Ctx = Annotated[ApiContext, Depends(context)]


class RpcCall(BaseModel):
    """Body of POST /api/v1/devices/{id}/rpc."""

    model_config = ConfigDict(extra="forbid")
    method: str = Field(min_length=1, max_length=255)
    params: Any = Field(default_factory=dict)
    timeout_ms: int = Field(10_000, gt=0, le=MAX_TIMEOUT_MS)
    oneway: bool = False


@router.post(
    "",
    response_class=MsgspecResponse,
    responses={
        200: {"description": "the device's reply (two-way) or {} once delivered (one-way)"},
        504: {"description": "the device did not answer or was not reachable in time"},
    },
)
async def call_device(device_id: str, body: RpcCall, ctx: Ctx) -> MsgspecResponse:
    """Ask the device to run `method`; waits for its reply up to `timeout_ms`."""
    device = await ctx.registry.get(device_id)
    reply = await ctx.rpc.call(
        device, body.method, body.params, timeout_ms=body.timeout_ms, oneway=body.oneway
    )
    return MsgspecResponse({} if reply is None else reply)
