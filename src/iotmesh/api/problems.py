"""Errors as `application/problem+json` (RFC 9457), mapped in this one place.

Every error response of the HTTP API has the same shape:
`{"type": "about:blank", "title": "Not Found", "status": 404, "detail": "..."}`.
"""

from __future__ import annotations

import http
import logging

import msgspec
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from iotmesh.api.body import ClientGone
from iotmesh.bus.interface import DeadLettered
from iotmesh.cluster.errors import CallFailed, ClusterError, StaleToken
from iotmesh.core import errors

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"

# Most specific first: the first matching class decides the status.
_STATUS: tuple[tuple[type[errors.IotmeshError], int], ...] = (
    (ClientGone, 400),  # nobody reads this answer; not a server error either
    (errors.PayloadTooLarge, 413),
    (errors.PayloadError, 400),
    (errors.AuthError, 401),
    (errors.NotFound, 404),
    (errors.Conflict, 409),
    (StaleToken, 409),
    (errors.Overloaded, 503),  # cluster.NoInstance too: no instance to call, retry later
    (errors.StorageError, 503),
    (errors.DeviceTimeout, 504),
    (errors.DeviceGone, 502),
    (CallFailed, 502),
    (ClusterError, 503),  # the cluster engine failed: a local fault, like storage
    (DeadLettered, 422),
)


def status_of(exc: errors.IotmeshError) -> int:
    """The HTTP status of an iotmesh error (500 for anything unmapped)."""
    for cls, status in _STATUS:
        if isinstance(exc, cls):
            return status
    return 500


def problem_body(status: int, detail: str) -> bytes:
    """The problem+json document of an error response."""
    body = {
        "type": "about:blank",
        "title": http.HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
    }
    return msgspec.json.encode(body)


def problem(status: int, detail: str, headers: dict[str, str] | None = None) -> Response:
    """Build a problem+json response."""
    return Response(problem_body(status, detail), status, headers, media_type=PROBLEM_JSON)


def error_response(exc: errors.IotmeshError, method: str, path: str) -> tuple[int, dict[str, str]]:
    """Status and extra headers of the response to an iotmesh error (logged if 5xx).

    Used by FastAPI's handler below and by the ASGI fast path (api/fastpath.py), so
    both answer the same error the same way."""
    status = status_of(exc)
    headers: dict[str, str] = {}
    if isinstance(exc, errors.Overloaded):
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    elif isinstance(exc, errors.StorageError):
        headers["Retry-After"] = "5"
    elif isinstance(exc, errors.AuthError) and path.startswith("/api/v1/devices"):
        headers["WWW-Authenticate"] = "Bearer"
    if status >= 500:
        log.warning("%s %s -> %d: %s", method, path, status, exc)
    return status, headers


async def _iotmesh_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, errors.IotmeshError)
    status, headers = error_response(exc, request.method, request.url.path)
    return problem(status, str(exc), headers)


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "request"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return problem(400, "; ".join(parts))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return problem(exc.status_code, str(exc.detail), dict(exc.headers or {}))


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return problem(500, f"internal error ({type(exc).__name__}); the server log has details")


def install(app: FastAPI) -> None:
    """Register the handlers that turn every error into problem+json."""
    app.add_exception_handler(Exception, _unexpected_error)
    app.add_exception_handler(errors.IotmeshError, _iotmesh_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
