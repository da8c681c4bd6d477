"""REST: a device's twin and connectivity (admin only)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel

from iotmesh.api.auth import require_admin
from iotmesh.api.context import ApiContext, MsgspecResponse, context

router = APIRouter(
    prefix="/api/v1/devices/{device_id}",
    tags=["device state"],
    dependencies=[Depends(require_admin)],
)

Ctx = Annotated[ApiContext, Depends(context)]


class TwinValueOut(BaseModel):
    value: Any
    version: int
    ts: int


class TwinOut(BaseModel):
    """desired = SHARED attributes, reported = CLIENT attributes."""

    desired: dict[str, TwinValueOut]
    reported: dict[str, TwinValueOut]
    desired_version: int
    reported_version: int


class ConnectivityOut(BaseModel):
    """Times in Unix ms, 0 for never."""

    online: bool
    transport: str | None
    last_activity_ts: int
    last_connect_ts: int
    last_disconnect_ts: int
    sessions: int


@router.get("/twin", response_class=MsgspecResponse, responses={200: {"model": TwinOut}})
async def get_twin(device_id: str, ctx: Ctx) -> MsgspecResponse:
    """The device's twin: desired state (SHARED attributes, pushed to the device) and
    reported state (CLIENT attributes, sent by it), each key with version and time."""
    device = await ctx.registry.get(device_id)
    return MsgspecResponse(await ctx.attributes.twin(device.id))


@router.get(
    "/connectivity", response_class=MsgspecResponse, responses={200: {"model": ConnectivityOut}}
)
async def get_connectivity(device_id: str, ctx: Ctx) -> MsgspecResponse:
    """Whether the device is online, over which transport, and when it was last heard."""
    device = await ctx.registry.get(device_id)
    return MsgspecResponse(await ctx.connectivity.read(device.id))
