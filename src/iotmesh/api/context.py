"""What the HTTP API needs from the rest of the platform, handed in at start-up."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
from fastapi import Request, Response

from iotmesh.api.polls import LongPolls
from iotmesh.commands.rpc import RpcService
from iotmesh.core.ids import SERVICE_NAME
from iotmesh.core.lifecycle import Health, Service
from iotmesh.core.settings import Settings
from iotmesh.devicestate import AttributeService, ConnectivityService
from iotmesh.pipeline.ingest import TelemetryIngest
from iotmesh.pipeline.latest import LatestCache
from iotmesh.registry.service import DeviceRegistry
from iotmesh.storage.timeseries import TimeSeriesStore


@dataclasses.dataclass(frozen=True)
class ApiContext:
    """The services behind the API; the API never picks implementations itself."""

    settings: Settings
    admin_token: str
    registry: DeviceRegistry
    attributes: AttributeService
    rpc: RpcService
    connectivity: ConnectivityService
    timeseries: TimeSeriesStore
    latest: LatestCache
    ingest: TelemetryIngest
    health: Callable[[], dict[str, Health]]
    stats: Callable[[], dict[str, dict[str, Any]]]
    long_polls: LongPolls = dataclasses.field(default_factory=LongPolls)
    ready: Callable[[], list[str]] = dataclasses.field(default=lambda: [])
    """Why the process should get no traffic now (empty: ready); see `/readyz`."""
    services: Sequence[Service] = ()
    """The started services, read at each scrape of `/metrics`."""
    service: str = SERVICE_NAME
    """What this process runs, in `/metrics` build info (`iotmesh-<role>` in serve)."""


async def context(request: Request) -> ApiContext:
    """FastAPI dependency: the ApiContext of the running app.

    `async` on purpose: FastAPI runs a plain `def` dependency in a worker thread, a
    thread hop per request that cost ~15% of the server's CPU under HTTP load."""
    ctx: ApiContext = request.app.state.ctx
    return ctx


class MsgspecResponse(Response):
    """JSON response encoded with msgspec: fast, and encodes Structs directly."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return msgspec.json.encode(content)
