"""The ThingsBoard device HTTP API: devices authenticate by the token in the path.

    POST /api/v1/{token}/telemetry          telemetry, any ThingsBoard JSON form
    POST /api/v1/{token}/attributes         client attributes
    GET  /api/v1/{token}/attributes         ?clientKeys=a,b&sharedKeys=c → {"client", "shared"}
    POST /api/v1/{token}/rpc                client-side RPC {"method", "params"} → the answer
    POST /api/v1/{token}/rpc/{id}           the device's reply to server-side RPC {id}
    GET  /api/v1/{token}/attributes/updates long-poll, see `api/device_poll.py`
    GET  /api/v1/{token}/rpc                long-poll, see `api/device_poll.py`

Uploads answer 200 only after they are durable (telemetry committed, attributes saved).
Every request counts as activity of the device (`ctx.connectivity`, transport "http").

Errors (problem+json, mapped in api/problems.py): 400 malformed payload, 401 unknown
token, 413 over `http.max_payload_bytes`, 503 (with Retry-After) when the pipeline has
no room within `http.enqueue_timeout_s`.

Tracing: when on, an upload is an `http.telemetry` span, the root of the message's
trace, or a child of the request's W3C `traceparent` header when it has one.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response

from iotmesh.api.body import receive_body
from iotmesh.api.context import ApiContext, MsgspecResponse, context
from iotmesh.commands.client_rpc import answer_client_rpc
from iotmesh.core.clock import now_ms
from iotmesh.core.errors import PayloadError
from iotmesh.core.tracing import Context, SpanKind, context_of, parent_from, use_span
from iotmesh.core.types import AttributeScope, Device
from iotmesh.proto.thingsboard import (
    attributes_from_json,
    decode_json,
    parse_telemetry,
    split_keys,
)

TRANSPORT = "http"
_REQUEST_ID = re.compile(r"[0-9]{1,18}")

router = APIRouter(prefix="/api/v1/{access_token}", tags=["device API"])

Ctx = Annotated[ApiContext, Depends(context)]


async def read_body(request: Request, limit: int) -> bytes:
    """Read the request body, refusing more than `limit` bytes without keeping it."""
    return await receive_body(request.receive, request.headers.get("content-length"), limit)


async def authenticate(ctx: ApiContext, access_token: str) -> Device:
    """The device of an access token, its request counted as activity.

    Raises:
        AuthError: unknown or revoked token (401).
    """
    device = await ctx.registry.authenticate(access_token)
    ctx.connectivity.activity(device.id, TRANSPORT)
    return device


async def read_upload(request: Request, ctx: ApiContext, access_token: str) -> tuple[Device, Any]:
    """The device and its upload as JSON: the body (within `http.max_payload_bytes`) is
    read first, then the token checked (401 before 400, as for telemetry), then parsed."""
    body = await read_body(request, ctx.settings.http.max_payload_bytes)
    device = await authenticate(ctx, access_token)
    return device, decode_json(body)


_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "malformed JSON or values"},
    401: {"description": "unknown access token"},
    413: {"description": "payload too large"},
}


@router.post(
    "/telemetry",
    status_code=200,
    responses={
        400: {"description": "malformed JSON or values"},
        401: {"description": "unknown access token"},
        413: {"description": "payload too large"},
        503: {"description": "overloaded; retry after the Retry-After seconds"},
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "examples": {
                        "values": {"value": {"temperature": 21.5, "humidity": 40}},
                        "with ts": {
                            "value": {"ts": 1700000000000, "values": {"temperature": 21.5}}
                        },
                        "array": {"value": [{"ts": 1700000000000, "values": {"t": 1}}, {"t": 2}]},
                    }
                }
            },
        }
    },
)
async def post_telemetry(access_token: str, request: Request, ctx: Ctx) -> Response:
    """Upload telemetry in any ThingsBoard JSON form; 200 means it is stored durably."""
    # With tracing off the ASGI fast path in front of FastAPI (api/fastpath.py) serves
    # this, taking the same steps; this route documents it and is the reference for it.
    tracing = ctx.ingest.tracing
    if tracing is None:
        await _store_telemetry(access_token, request, ctx)
        return Response(status_code=200)
    attributes = {"http.request.method": "POST", "http.route": TELEMETRY_ROUTE}
    header = request.headers.get("traceparent")
    if header:  # the caller's trace: its sampled flag decides
        span = tracing.tracer.start_span(
            "http.telemetry", parent_from(header), SpanKind.SERVER, attributes
        )
    elif tracing.sampled():
        span = tracing.start_root("http.telemetry", SpanKind.SERVER, attributes)
    else:
        await _store_telemetry(access_token, request, ctx)
        return Response(status_code=200)
    with use_span(span, end_on_exit=True):  # current too: log lines show the trace id
        device_id = await _store_telemetry(access_token, request, ctx, context_of(span))
        span.set_attribute("iotmesh.device_id", device_id)
        span.set_attribute("http.response.status_code", 200)
    return Response(status_code=200)


TELEMETRY_ROUTE = "/api/v1/{access_token}/telemetry"


async def _store_telemetry(
    access_token: str, request: Request, ctx: ApiContext, trace: Context | None = None
) -> str:
    """Read, authenticate, parse and submit one upload; return the device id."""
    body = await read_body(request, ctx.settings.http.max_payload_bytes)
    device = await authenticate(ctx, access_token)
    records = parse_telemetry(body, now_ms())
    await ctx.ingest.submit(device.id, records, trace)
    return device.id


@router.post(
    "/attributes",
    status_code=200,
    responses=_ERRORS,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"example": {"firmware": "1.2", "uptime": 360}}},
        }
    },
)
async def post_attributes(access_token: str, request: Request, ctx: Ctx) -> Response:
    """Report client attributes; 200 means they are saved."""
    device, doc = await read_upload(request, ctx, access_token)
    await ctx.attributes.save(device.id, AttributeScope.CLIENT, attributes_from_json(doc))
    return Response(status_code=200)


KeysParam = Annotated[str | None, Query(description="Comma-separated keys; all when absent.")]


@router.get(
    "/attributes",
    response_class=MsgspecResponse,
    responses={
        200: {"content": {"application/json": {"example": {"client": {"fw": "1.2"}}}}},
        401: _ERRORS[401],
    },
)
async def get_attributes(
    access_token: str,
    ctx: Ctx,
    clientKeys: KeysParam = None,  # noqa: N803 (ThingsBoard's parameter name)
    sharedKeys: KeysParam = None,  # noqa: N803
) -> MsgspecResponse:
    """Client and shared attribute values: the named keys of each scope, or all of both
    scopes when neither parameter is given (as ThingsBoard)."""
    device = await authenticate(ctx, access_token)
    client_keys = split_keys(clientKeys or None)
    shared_keys = split_keys(sharedKeys or None)
    everything = client_keys is None and shared_keys is None
    answer: dict[str, Any] = {}
    if everything or client_keys:
        answer["client"] = await ctx.attributes.values(
            device.id, AttributeScope.CLIENT, client_keys
        )
    if everything or shared_keys:
        answer["shared"] = await ctx.attributes.values(
            device.id, AttributeScope.SHARED, shared_keys
        )
    return MsgspecResponse(answer)


@router.post(
    "/rpc",
    response_class=MsgspecResponse,
    responses=_ERRORS,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"example": {"method": "getCurrentTime"}}},
        }
    },
)
async def client_rpc(access_token: str, request: Request, ctx: Ctx) -> MsgspecResponse:
    """Client-side RPC: the platform answers `{"method", "params"}` (see
    commands/client_rpc.py for the methods); an unknown method gets `{"error": ...}`."""
    _, doc = await read_upload(request, ctx, access_token)  # the answer needs no device yet
    if not isinstance(doc, dict) or not isinstance(doc.get("method"), str):
        raise PayloadError('client RPC must be a JSON object with a "method" string')
    return MsgspecResponse(answer_client_rpc(doc["method"], doc.get("params")))


@router.post(
    "/rpc/{request_id}",
    status_code=200,
    responses={**_ERRORS, 200: {"description": "reply handed over (or stale: ignored)"}},
)
async def rpc_reply(access_token: str, request_id: str, request: Request, ctx: Ctx) -> Response:
    """The device's reply to server-side RPC `request_id` (any JSON; other text is kept
    as a string). A reply nobody waits for any more is ignored, as ThingsBoard does."""
    # The id is checked after the body is read: an answer sent before the request's
    # body was received made hypercorn's HTTP/2 end the whole connection.
    body = await read_body(request, ctx.settings.http.max_payload_bytes)
    device = await authenticate(ctx, access_token)
    if not _REQUEST_ID.fullmatch(request_id):
        raise PayloadError(f"RPC request id {request_id!r} is not a number")
    try:
        payload: Any = decode_json(body)
    except PayloadError:
        payload = body.decode("utf-8", "replace")
    ctx.rpc.reply(device.id, int(request_id), payload)
    await ctx.rpc.flushed()  # 200 once the reply is stored
    return Response(status_code=200)
