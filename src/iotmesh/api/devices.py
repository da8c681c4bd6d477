"""REST: devices and their credentials (admin only)."""

from __future__ import annotations

from typing import Annotated

import msgspec
from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, ConfigDict, Field

from iotmesh.api.auth import require_admin
from iotmesh.api.context import ApiContext, MsgspecResponse, context
from iotmesh.api.device_state import ConnectivityOut
from iotmesh.registry.service import DeviceUpdate

router = APIRouter(
    prefix="/api/v1/devices", tags=["devices"], dependencies=[Depends(require_admin)]
)

Ctx = Annotated[ApiContext, Depends(context)]


class DeviceCreate(BaseModel):
    """Body of POST /api/v1/devices."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=255)
    type: str = Field("default", max_length=255)
    label: str | None = Field(None, max_length=255)
    access_token: str | None = Field(None, description="Generated when absent.")
    gateway: bool = Field(False, description="The device is a gateway for other devices.")


class DevicePatch(BaseModel):
    """Body of PATCH /api/v1/devices/{id}: only the fields given change."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(None, min_length=1, max_length=255)
    type: str | None = Field(None, max_length=255)
    label: str | None = Field(None, max_length=255)
    gateway: bool | None = None


class CredentialsRotate(BaseModel):
    """Body of POST /api/v1/devices/{id}/credentials (optional)."""

    model_config = ConfigDict(extra="forbid")
    access_token: str | None = Field(None, description="Generated when absent.")
    certificate_pem: str | None = Field(
        None,
        description="An X.509 client certificate (PEM) the device may log in with over"
        " MQTT/TLS; given alone it is added and the access token is kept.",
    )


class DeviceOut(BaseModel):
    """A device as the API shows it."""

    id: str
    name: str
    type: str
    label: str | None
    created_ts: int
    access_token: str
    gateway: bool
    gateway_id: str | None
    cert_fingerprint: str | None


class DeviceStateOut(DeviceOut):
    """One device with its connectivity, as GET /api/v1/devices/{id} shows it."""

    connectivity: ConnectivityOut


class DevicePageOut(BaseModel):
    """A page of devices."""

    data: list[DeviceOut]
    total: int
    page: int
    page_size: int
    has_next: bool


@router.post(
    "",
    status_code=201,
    response_class=MsgspecResponse,
    responses={201: {"model": DeviceOut}, 409: {"description": "name or token taken"}},
)
async def create_device(body: DeviceCreate, ctx: Ctx) -> MsgspecResponse:
    """Register a device; its access token is generated unless given."""
    device = await ctx.registry.create(
        body.name,
        type=body.type,
        label=body.label,
        access_token=body.access_token,
        gateway=body.gateway,
    )
    return MsgspecResponse(device, status_code=201)


@router.get("", response_class=MsgspecResponse, responses={200: {"model": DevicePageOut}})
async def list_devices(
    ctx: Ctx,
    page: Annotated[int, Query(ge=0)] = 0,
    page_size: Annotated[int, Query(ge=1, le=1000)] = 100,
    text_search: Annotated[str | None, Query(max_length=255)] = None,
) -> MsgspecResponse:
    """List devices, oldest first, a page at a time (page is 0-based)."""
    return MsgspecResponse(await ctx.registry.list(page, page_size, text_search))


@router.get(
    "/{device_id}", response_class=MsgspecResponse, responses={200: {"model": DeviceStateOut}}
)
async def get_device(device_id: str, ctx: Ctx) -> MsgspecResponse:
    """One device, with its connectivity (online, transport, last activity)."""
    device = await ctx.registry.get(device_id)
    body = msgspec.structs.asdict(device)
    body["connectivity"] = await ctx.connectivity.read(device.id)
    return MsgspecResponse(body)


@router.patch("/{device_id}", response_class=MsgspecResponse, responses={200: {"model": DeviceOut}})
async def patch_device(device_id: str, body: DevicePatch, ctx: Ctx) -> MsgspecResponse:
    """Change a device's name, type or label."""
    # null means "clear" for the label only; for the other fields it means "unchanged".
    given = body.model_dump(exclude_unset=True)
    update = DeviceUpdate(**{k: v for k, v in given.items() if v is not None or k == "label"})
    return MsgspecResponse(await ctx.registry.update(device_id, update))


@router.delete("/{device_id}", status_code=204)
async def delete_device(device_id: str, ctx: Ctx) -> None:
    """Delete a device, its token, telemetry and RPC requests."""
    await ctx.registry.delete(device_id)
    ctx.rpc.forget(device_id)
    await ctx.connectivity.forget_shared(device_id)
    await ctx.latest.invalidate(device_id)
    await ctx.timeseries.delete_entity(device_id)


@router.post(
    "/{device_id}/credentials",
    response_class=MsgspecResponse,
    responses={200: {"model": DeviceOut}},
)
async def rotate_credentials(
    device_id: str, ctx: Ctx, body: CredentialsRotate | None = None
) -> MsgspecResponse:
    """Give the device a new access token (the old one stops working at once), or
    register its X.509 client certificate."""
    if body is not None and body.certificate_pem is not None:
        device = await ctx.registry.set_certificate(device_id, body.certificate_pem)
        if body.access_token is None:
            return MsgspecResponse(device)
    token = body.access_token if body else None
    return MsgspecResponse(await ctx.registry.rotate_token(device_id, token))
