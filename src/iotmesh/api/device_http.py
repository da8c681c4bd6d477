"""The ThingsBoard device HTTP API: devices authenticate by the token in the path.

`POST /api/v1/{access_token}/telemetry` answers 200 only after the points are durable.
Errors: 400 malformed payload, 401 unknown token, 413 over `http.max_payload_bytes`,
503 (with Retry-After) when the pipeline has no room within `http.enqueue_timeout_s`.

Tracing: when on, an upload is an `http.telemetry` span, the root of the message's
trace, or a child of the request's W3C `traceparent` header when it has one.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response

from iotmesh.api.context import ApiContext, context
from iotmesh.core.clock import now_ms
from iotmesh.core.errors import PayloadError, PayloadTooLarge
from iotmesh.core.tracing import Context, SpanKind, context_of, parent_from, use_span
from iotmesh.proto.thingsboard import parse_telemetry

router = APIRouter(prefix="/api/v1/{access_token}", tags=["device API"])

Ctx = Annotated[ApiContext, Depends(context)]


# An oversized body is read and discarded up to this many bytes before the 413 goes
# out: an HTTP/1.1 client still sending would otherwise see the connection reset
# instead of the answer. Beyond it the server answers at once and closes.
_DRAIN_LIMIT = 1 << 20


async def _discard_rest(request: Request, already: int) -> None:
    async for chunk in request.stream():
        already += len(chunk)
        if already > _DRAIN_LIMIT:
            return


async def read_body(request: Request, limit: int) -> bytes:
    """Read the request body, refusing more than `limit` bytes without keeping it."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise PayloadError("Content-Length is not a number") from None
        if size > limit:
            if size <= _DRAIN_LIMIT:
                await _discard_rest(request, 0)
            raise PayloadTooLarge(size, limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            await _discard_rest(request, len(body))
            raise PayloadTooLarge(len(body), limit)
    return bytes(body)


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
    device = await ctx.registry.authenticate(access_token)
    records = parse_telemetry(body, now_ms())
    await ctx.ingest.submit(device.id, records, trace)
    return device.id
