"""REST: server-side RPC to a device, and the stored requests (admin only)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, ConfigDict, Field

from iotmesh.api.auth import require_admin
from iotmesh.api.context import ApiContext, MsgspecResponse, context
from iotmesh.commands.rpc import MAX_EXPIRATION_MS, MAX_TIMEOUT_MS
from iotmesh.core.clock import now_ms
from iotmesh.core.errors import PayloadError
from iotmesh.core.types import RpcStatus

router = APIRouter(
    prefix="/api/v1/devices/{device_id}/rpc", tags=["rpc"], dependencies=[Depends(require_admin)]
)

Ctx = Annotated[ApiContext, Depends(context)]


class RpcCall(BaseModel):
    """Body of POST /api/v1/devices/{id}/rpc."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    method: str = Field(min_length=1, max_length=255)
    params: Any = Field(default_factory=dict)
    timeout_ms: int = Field(
        10_000,
        gt=0,
        le=MAX_TIMEOUT_MS,
        description="How long to wait for the reply (for a persistent request: after it was sent).",
    )
    oneway: bool = False
    persistent: bool = Field(
        False,
        description="Store the request and answer at once with its id; it is delivered"
        " when the device connects, also after a restart, until it expires.",
    )
    expiration_ms: int | None = Field(
        None,
        gt=0,
        le=MAX_EXPIRATION_MS,
        description="Persistent only: how long the request may wait for delivery, from now"
        " (default devices.rpc_default_expiration_s).",
    )
    expiration_time: int | None = Field(
        None,
        alias="expirationTime",
        gt=0,
        description="Persistent only: the same as an absolute Unix time in ms (ThingsBoard).",
    )


class RpcOut(BaseModel):
    """A stored RPC request (times in Unix ms)."""

    device_id: str
    id: int
    method: str
    params: Any
    oneway: bool
    persistent: bool
    status: RpcStatus
    timeout_ms: int
    created_ts: int
    expiration_ts: int
    sent_ts: int | None
    delivered_ts: int | None
    finished_ts: int | None
    response: Any
    error: str | None


class RpcPageOut(BaseModel):
    """A page of RPC requests, newest first."""

    data: list[RpcOut]
    total: int
    page: int
    page_size: int
    has_next: bool


@router.post(
    "",
    response_class=MsgspecResponse,
    responses={
        200: {
            "description": "the device's reply (two-way), {} once delivered (one-way), or"
            ' {"rpcId", "status"} at once (persistent)'
        },
        502: {"description": "the device's session failed to take the request"},
        503: {"description": "the device has too many unfinished requests"},
        504: {"description": "the device did not answer or was not reachable in time"},
    },
)
async def call_device(device_id: str, body: RpcCall, ctx: Ctx) -> MsgspecResponse:
    """Ask the device to run `method`. Waits for its reply up to `timeout_ms`, unless
    `persistent`: then the request is stored and its id returned at once."""
    device = await ctx.registry.get(device_id)
    expiration = body.expiration_ms is not None or body.expiration_time is not None
    if not body.persistent:
        if expiration:
            raise PayloadError("an expiration applies to persistent requests only")
        reply = await ctx.rpc.call(
            device, body.method, body.params, timeout_ms=body.timeout_ms, oneway=body.oneway
        )
        return MsgspecResponse({} if reply is None else reply)
    if body.expiration_ms is not None and body.expiration_time is not None:
        raise PayloadError("give expiration_ms or expirationTime, not both")
    expiration_ts = body.expiration_time
    if body.expiration_ms is not None:
        expiration_ts = now_ms() + body.expiration_ms
    record = await ctx.rpc.submit(
        device,
        body.method,
        body.params,
        timeout_ms=body.timeout_ms,
        oneway=body.oneway,
        expiration_ts=expiration_ts,
    )
    return MsgspecResponse({"rpcId": record.id, "status": record.status})


@router.get("", response_class=MsgspecResponse, responses={200: {"model": RpcPageOut}})
async def list_requests(
    device_id: str,
    ctx: Ctx,
    page: Annotated[int, Query(ge=0)] = 0,
    page_size: Annotated[int, Query(ge=1, le=1000)] = 100,
    status: Annotated[
        list[RpcStatus] | None, Query(description="Only these statuses (repeatable).")
    ] = None,
) -> MsgspecResponse:
    """The device's RPC requests, newest first, a page at a time (page is 0-based)."""
    device = await ctx.registry.get(device_id)
    return MsgspecResponse(await ctx.rpc.list(device.id, page, page_size, status or None))


@router.get("/{rpc_id}", response_class=MsgspecResponse, responses={200: {"model": RpcOut}})
async def get_request(device_id: str, rpc_id: int, ctx: Ctx) -> MsgspecResponse:
    """One RPC request with its status, times and the device's reply."""
    device = await ctx.registry.get(device_id)
    return MsgspecResponse(await ctx.rpc.get(device.id, rpc_id))


@router.delete("/{rpc_id}", status_code=204)
async def delete_request(device_id: str, rpc_id: int, ctx: Ctx) -> None:
    """Delete an RPC request; an unfinished one is withdrawn and never delivered."""
    device = await ctx.registry.get(device_id)
    await ctx.rpc.delete(device.id, rpc_id)
