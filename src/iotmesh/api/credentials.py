"""REST: a device's credentials, one typed entry per kind (admin only).

A device always has an access token (HTTP and MQTT user name). It may also have an
X.509 client certificate (MQTT over TLS) and MQTT Basic credentials (client id, user
name, password, as ThingsBoard's "MQTT Basic"). `GET` lists them without secrets, `PUT`
replaces the one of the body's `type` (the old one stops working at once), `DELETE`
removes a certificate or MQTT Basic credentials. `POST .../credentials` (in
`devices.py`) stays as it was: rotate the token, or add a certificate.
"""

from __future__ import annotations

import enum
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field

from iotmesh.api.auth import require_admin
from iotmesh.api.context import ApiContext, MsgspecResponse, context
from iotmesh.core.errors import PayloadError

router = APIRouter(
    prefix="/api/v1/devices/{device_id}/credentials",
    tags=["devices"],
    dependencies=[Depends(require_admin)],
)

Ctx = Annotated[ApiContext, Depends(context)]


class CredentialsType(enum.StrEnum):
    """The kinds of device credentials."""

    ACCESS_TOKEN = "ACCESS_TOKEN"
    X509_CERTIFICATE = "X509_CERTIFICATE"
    MQTT_BASIC = "MQTT_BASIC"


class AccessTokenIn(BaseModel):
    """A new access token (generated when `token` is absent)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["ACCESS_TOKEN"]
    token: str | None = Field(None, description="Generated when absent.")


class CertificateIn(BaseModel):
    """An X.509 client certificate the device logs in with over MQTT/TLS."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["X509_CERTIFICATE"]
    certificate_pem: str = Field(max_length=65536)


class MqttBasicIn(BaseModel):
    """MQTT Basic credentials: a client id, a user name, or both; a password needs a
    user name. The password is stored hashed and never shown again."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["MQTT_BASIC"]
    client_id: str | None = None
    username: str | None = None
    password: str | None = None


CredentialsIn = Annotated[AccessTokenIn | CertificateIn | MqttBasicIn, Field(discriminator="type")]


class CredentialsOut(BaseModel):
    """One entry of the list: `type` and the fields of that type, never a password."""

    type: CredentialsType
    token: str | None = Field(None, description="ACCESS_TOKEN")
    fingerprint: str | None = Field(None, description="X509_CERTIFICATE: SHA-256, hex")
    client_id: str | None = Field(None, description="MQTT_BASIC")
    username: str | None = Field(None, description="MQTT_BASIC")
    password_set: bool | None = Field(None, description="MQTT_BASIC: a password is needed")


async def _view(ctx: ApiContext, device_id: str) -> list[dict[str, Any]]:
    device = await ctx.registry.get(device_id)
    entries: list[dict[str, Any]] = [
        {"type": CredentialsType.ACCESS_TOKEN, "token": device.access_token}
    ]
    if device.cert_fingerprint is not None:
        entries.append(
            {"type": CredentialsType.X509_CERTIFICATE, "fingerprint": device.cert_fingerprint}
        )
    basic = await ctx.registry.basic_credentials(device_id)
    if basic is not None:
        entries.append(
            {
                "type": CredentialsType.MQTT_BASIC,
                "client_id": basic.client_id,
                "username": basic.username,
                "password_set": basic.password_hash is not None,
            }
        )
    return entries


@router.get("", response_class=MsgspecResponse, responses={200: {"model": list[CredentialsOut]}})
async def get_credentials(device_id: str, ctx: Ctx) -> MsgspecResponse:
    """The device's credentials, one entry per type it has (the access token first)."""
    return MsgspecResponse(await _view(ctx, device_id))


@router.put(
    "",
    response_class=MsgspecResponse,
    responses={
        200: {"model": list[CredentialsOut]},
        409: {"description": "another device has this token, certificate or login"},
    },
)
async def put_credentials(device_id: str, body: CredentialsIn, ctx: Ctx) -> MsgspecResponse:
    """Replace the device's credentials of the body's type; answer with all of them."""
    registry = ctx.registry
    if isinstance(body, AccessTokenIn):
        await registry.rotate_token(device_id, body.token)
    elif isinstance(body, CertificateIn):
        await registry.set_certificate(device_id, body.certificate_pem)
    else:
        await registry.set_basic_credentials(
            device_id, client_id=body.client_id, username=body.username, password=body.password
        )
    return MsgspecResponse(await _view(ctx, device_id))


@router.delete("/{kind}", status_code=204)
async def delete_credentials(device_id: str, kind: CredentialsType, ctx: Ctx) -> None:
    """Remove the device's certificate or MQTT Basic credentials (done when absent)."""
    if kind is CredentialsType.ACCESS_TOKEN:
        raise PayloadError("a device always has an access token; PUT a new one to replace it")
    if kind is CredentialsType.X509_CERTIFICATE:
        await ctx.registry.set_certificate(device_id, None)
    else:
        await ctx.registry.clear_basic_credentials(device_id)
