"""REST: query, inspect and delete a device's telemetry (admin only)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query

from iotmesh.api.auth import require_admin
from iotmesh.api.context import ApiContext, MsgspecResponse, context
from iotmesh.api.params import query_keys
from iotmesh.core.clock import now_ms
from iotmesh.core.errors import PayloadError
from iotmesh.core.types import Aggregation, Order
from iotmesh.proto.thingsboard import MAX_TS
from iotmesh.storage import timeseries

router = APIRouter(
    prefix="/api/v1/devices/{device_id}/telemetry",
    tags=["telemetry"],
    dependencies=[Depends(require_admin)],
)

Ctx = Annotated[ApiContext, Depends(context)]
KeysParam = Annotated[
    str | None, Query(description="Comma-separated keys; all keys of the device when absent.")
]
MAX_LIMIT = 100_000

_POINTS_EXAMPLE = {
    "application/json": {"example": {"temperature": [{"ts": 1700000000000, "value": 21.5}]}}
}


@router.get("", response_class=MsgspecResponse, responses={200: {"content": _POINTS_EXAMPLE}})
async def query_telemetry(
    device_id: str,
    ctx: Ctx,
    keys: KeysParam = None,
    start_ts: Annotated[int, Query(ge=0, description="Inclusive, Unix ms.")] = 0,
    end_ts: Annotated[int | None, Query(ge=0, description="Inclusive, Unix ms; now.")] = None,
    agg: Aggregation = Aggregation.NONE,
    interval_ms: Annotated[int, Query(ge=0, description="Bucket width for agg.")] = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 100,
    order: Order = Order.DESC,
) -> MsgspecResponse:
    """Raw points, or aggregates over fixed intervals, of some keys in a time range."""
    device = await ctx.registry.get(device_id)
    end = now_ms() if end_ts is None else end_ts
    if start_ts > end:
        raise PayloadError("start_ts must not be after end_ts")
    if agg is not Aggregation.NONE and interval_ms <= 0:
        raise PayloadError("interval_ms must be a positive number of milliseconds with agg")
    wanted = query_keys(keys) or await ctx.timeseries.keys(device.id)
    if not wanted:
        return MsgspecResponse({})
    query = timeseries.Query(
        device.id, tuple(wanted), start_ts, end, agg, interval_ms, limit, order
    )
    return MsgspecResponse(await ctx.timeseries.query(query))


@router.get(
    "/latest", response_class=MsgspecResponse, responses={200: {"content": _POINTS_EXAMPLE}}
)
async def latest_telemetry(device_id: str, ctx: Ctx, keys: KeysParam = None) -> MsgspecResponse:
    """The newest point of each key, in the same shape as a query (one point per key)."""
    device = await ctx.registry.get(device_id)
    values = await ctx.latest.get(device.id)
    if values is None:
        values = await ctx.timeseries.latest(device.id)
        await ctx.latest.fill(device.id, values)
    wanted = query_keys(keys)
    chosen = values if wanted is None else {k: values[k] for k in wanted if k in values}
    return MsgspecResponse({key: [point] for key, point in sorted(chosen.items())})


@router.get(
    "/keys",
    response_class=MsgspecResponse,
    responses={200: {"content": {"application/json": {"example": ["temperature"]}}}},
)
async def telemetry_keys(device_id: str, ctx: Ctx) -> MsgspecResponse:
    """The keys this device has telemetry for."""
    device = await ctx.registry.get(device_id)
    return MsgspecResponse(await ctx.timeseries.keys(device.id))


@router.delete(
    "",
    response_class=MsgspecResponse,
    responses={200: {"content": {"application/json": {"example": {"deleted": 3}}}}},
)
async def delete_telemetry(
    device_id: str,
    ctx: Ctx,
    keys: KeysParam = None,
    start_ts: Annotated[int, Query(ge=0)] = 0,
    end_ts: Annotated[int | None, Query(ge=0)] = None,
) -> MsgspecResponse:
    """Delete points of some keys (all when absent) in a time range (all time when absent)."""
    device = await ctx.registry.get(device_id)
    end = MAX_TS if end_ts is None else end_ts
    wanted = query_keys(keys) or await ctx.timeseries.keys(device.id)
    deleted = await ctx.timeseries.delete(device.id, wanted, start_ts, end) if wanted else 0
    await ctx.latest.invalidate(device.id)
    return MsgspecResponse({"deleted": deleted})
