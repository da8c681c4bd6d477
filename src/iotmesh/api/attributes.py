"""REST: a device's attributes in each scope (admin only)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Query

from iotmesh.api.auth import require_admin
from iotmesh.api.context import ApiContext, MsgspecResponse, context
from iotmesh.api.params import query_keys
from iotmesh.core.types import AttributeScope

router = APIRouter(
    prefix="/api/v1/devices/{device_id}/attributes",
    tags=["attributes"],
    dependencies=[Depends(require_admin)],
)

Ctx = Annotated[ApiContext, Depends(context)]
ScopeParam = Annotated[AttributeScope, Query(description="CLIENT, SHARED or SERVER.")]

_EXAMPLE = {
    "application/json": {
        "example": [{"key": "fw", "value": "1.2", "last_update_ts": 1700000000000, "version": 3}]
    }
}


@router.get("", response_class=MsgspecResponse, responses={200: {"content": _EXAMPLE}})
async def get_attributes(
    device_id: str,
    ctx: Ctx,
    scope: ScopeParam = AttributeScope.SHARED,
    keys: Annotated[str | None, Query(description="Comma-separated; all when absent.")] = None,
) -> MsgspecResponse:
    """Attributes of one scope with their update time and version."""
    device = await ctx.registry.get(device_id)
    return MsgspecResponse(await ctx.attributes.get(device.id, scope, query_keys(keys)))


@router.post("", response_class=MsgspecResponse, responses={200: {"content": _EXAMPLE}})
async def save_attributes(
    device_id: str,
    ctx: Ctx,
    values: Annotated[dict[str, Any], Body(examples=[{"targetTemperature": 21}])],
    scope: ScopeParam = AttributeScope.SHARED,
) -> MsgspecResponse:
    """Set attributes; SHARED ones are pushed to the device at once if it is connected."""
    device = await ctx.registry.get(device_id)
    return MsgspecResponse(await ctx.attributes.save(device.id, scope, values))


@router.delete("", response_class=MsgspecResponse)
async def delete_attributes(
    device_id: str,
    ctx: Ctx,
    keys: Annotated[str, Query(description="Comma-separated keys to delete.")],
    scope: ScopeParam = AttributeScope.SHARED,
) -> MsgspecResponse:
    """Delete attributes of one scope; returns `{"deleted": n}`."""
    device = await ctx.registry.get(device_id)
    wanted = query_keys(keys) or []
    return MsgspecResponse({"deleted": await ctx.attributes.delete(device.id, scope, wanted)})
