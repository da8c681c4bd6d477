"""The FastAPI application: routers, problem+json errors, OpenAPI under /api."""

from __future__ import annotations

from fastapi import FastAPI

from iotmesh import __version__
from iotmesh.api import (
    attributes,
    credentials,
    device_http,
    device_poll,
    device_state,
    devices,
    health,
    metrics,
    problems,
    rpc,
    stats,
    telemetry,
)
from iotmesh.api.context import ApiContext
from iotmesh.api.fastpath import AsgiApp, TelemetryFastPath


def create_app(ctx: ApiContext) -> FastAPI:
    """Build the ASGI app over running services (they are started by the caller)."""
    app = FastAPI(
        title="iotmesh",
        version=__version__,
        summary="REST API and ThingsBoard-compatible device HTTP API",
        docs_url="/api/docs",
        redoc_url=None,
        openapi_url="/api/openapi.json",
    )
    app.state.ctx = ctx
    problems.install(app)
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(stats.router)
    app.include_router(devices.router)
    app.include_router(credentials.router)
    app.include_router(telemetry.router)
    app.include_router(attributes.router)
    app.include_router(rpc.router)
    app.include_router(device_state.router)
    app.include_router(device_http.router)
    app.include_router(device_poll.router)
    return app


def create_asgi_app(ctx: ApiContext) -> AsgiApp:
    """The app the HTTP server runs: the device-telemetry fast path in front of FastAPI."""
    return TelemetryFastPath(create_app(ctx), ctx)
