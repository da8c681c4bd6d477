"""An ASGI fast path for `POST /api/v1/{token}/telemetry`, in front of FastAPI.

Why: device telemetry is the one request that comes at thousands per second. Through
FastAPI each one walked about ten middleware and routing layers and the dependency
solver, which took about half of the server's CPU under load (py-spy, see
docs/benchmarks.md). Here the path is matched with two string tests and the request is
handled by the same steps as the FastAPI route (`api/device_http.py`): body within
`http.max_payload_bytes`, `authenticate` (which counts the device's activity),
`parse_telemetry`, `TelemetryIngest.submit` (returns once durable; its `submit_nowait`
when the bus has room), then 200.

Errors are answered exactly as the FastAPI route answers them: the same status,
problem+json body and headers (`api/problems.error_response`). Every other request,
and telemetry posted with a path FastAPI would not match the same way, goes to the
FastAPI app unchanged; the route stays there too, for OpenAPI and as the reference.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from iotmesh.api.body import ClientGone, Receive, receive_body
from iotmesh.api.context import ApiContext
from iotmesh.api.device_http import authenticate
from iotmesh.api.problems import PROBLEM_JSON, error_response, problem_body
from iotmesh.core.clock import now_ms
from iotmesh.core.errors import IotmeshError
from iotmesh.core.types import TsRecord
from iotmesh.proto.thingsboard import parse_telemetry

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
AsgiApp = Callable[[Scope, Receive, Send], Awaitable[None]]

PREFIX = "/api/v1/"
SUFFIX = "/telemetry"


def telemetry_token(scope: Scope) -> str | None:
    """The access token if `scope` is a device telemetry upload, else None."""
    if scope["type"] != "http" or scope["method"] != "POST":
        return None
    path: str = scope["path"]
    if not (path.startswith(PREFIX) and path.endswith(SUFFIX)):
        return None
    token = path[len(PREFIX) : -len(SUFFIX)]
    if not token or "/" in token:
        return None
    return token


def _content_length(scope: Scope) -> bytes | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return bytes(value)
    return None


class TelemetryFastPath:
    """ASGI app: device telemetry handled here, everything else by `app`."""

    def __init__(self, app: AsgiApp, ctx: ApiContext) -> None:
        self.app = app
        self._ctx = ctx
        self._limit = ctx.settings.http.max_payload_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        token = telemetry_token(scope)
        ctx = self._ctx
        if token is None or ctx.ingest.tracing is not None:
            # With tracing on, the FastAPI route makes the upload's span.
            await self.app(scope, receive, send)
            return
        try:
            body = await receive_body(receive, _content_length(scope), self._limit)
            device = await authenticate(ctx, token)
            records = parse_telemetry(body, now_ms())
            await _submit(ctx, device.id, records)
        except ClientGone:
            return  # nobody to answer
        except IotmeshError as exc:
            status, headers = error_response(exc, "POST", scope["path"])
            await _send_problem(send, status, str(exc), headers)
            return
        except Exception as exc:
            log.error("POST %s failed", scope["path"], exc_info=exc)
            detail = f"internal error ({type(exc).__name__}); the server log has details"
            await _send_problem(send, 500, detail, {})
            return
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"0")]}
        )
        await send({"type": "http.response.body", "body": b""})


async def _submit(ctx: ApiContext, device_id: str, records: list[TsRecord]) -> None:
    """`TelemetryIngest.submit`, without its enqueue timer when the bus has room at once
    (the common case; a timer per request was ~4% of the CPU)."""
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def settle(error: BaseException | None) -> None:
        if done.done():
            return
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)

    if ctx.ingest.submit_nowait(device_id, records, settle):
        await done
    else:
        await ctx.ingest.submit(device_id, records)


async def _send_problem(send: Send, status: int, detail: str, headers: dict[str, str]) -> None:
    body = problem_body(status, detail)
    raw = [
        (b"content-type", PROBLEM_JSON.encode()),
        (b"content-length", str(len(body)).encode()),
        *((k.lower().encode(), v.encode()) for k, v in headers.items()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
