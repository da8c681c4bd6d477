"""`GET /metrics`: every service's counters in the Prometheus text format.

Pull, not push: the hot path only bumps plain attributes; this endpoint reads them
through `Service.stats()` when Prometheus scrapes (see prometheus.py for the naming).
Besides the services' own numbers it shows:

- `iotmesh_build_info{version, python, service, instance}` 1 (service: `iotmesh`, or
  `iotmesh-<role>` in `iotmesh serve`);
- `iotmesh_ready` (what `/readyz` says) and `iotmesh_service_healthy{service}`;
- `iotmesh_leader{job}`: 1 while this instance leads a singleton job (and runs it), 0
  while it stands by (`iotmesh serve`; `iotmesh run` has no elections);
- `process_*` of this process as Prometheus' client libraries name them: CPU seconds,
  resident and virtual memory, open and maximum file descriptors, start time.

No credentials by default, as Prometheus expects (the numbers are counts, without
device ids or secrets); `http.metrics_auth = true` asks for the admin bearer token.
`collect` is also what the health listener of the other `iotmesh serve` roles answers
`/metrics` with (serve/health.py; no auth there, like its /stats).
"""

from __future__ import annotations

import os
import platform
import resource
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response

from iotmesh import __version__
from iotmesh.api.auth import require_admin
from iotmesh.api.context import ApiContext, context
from iotmesh.api.prometheus import CONTENT_TYPE, Registry
from iotmesh.cluster.singleton import Singleton
from iotmesh.core.ids import SERVICE_NAME, instance_id
from iotmesh.core.lifecycle import Service

router = APIRouter(tags=["health"])

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _boot_time() -> float | None:
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("btime "):
                return float(line.split()[1])
    except OSError:
        pass
    return None


_BOOT_TIME = _boot_time()


def add_process_metrics(registry: Registry) -> None:
    """This process's CPU, memory and file descriptors (Linux /proc; CPU elsewhere too)."""
    times = os.times()
    registry.add(
        "process_cpu_seconds_total",
        "counter",
        "User and system CPU time spent, in seconds.",
        times.user + times.system,
    )
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY:
        registry.add("process_max_fds", "gauge", "Maximum number of open file descriptors.", soft)
    try:
        stat = Path("/proc/self/stat").read_text()
        fds = len(os.listdir("/proc/self/fd"))
    except OSError:
        return  # not Linux: CPU is all we can say without a dependency
    # Fields after the command name (in parentheses, which may hold spaces).
    fields = stat[stat.rindex(")") + 2 :].split()
    registry.add(
        "process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes.", int(fields[20])
    )
    registry.add(
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory size in bytes.",
        int(fields[21]) * _PAGE_SIZE,
    )
    registry.add("process_open_fds", "gauge", "Number of open file descriptors.", fds)
    if _BOOT_TIME is not None:
        registry.add(
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since the Unix epoch, in seconds.",
            _BOOT_TIME + int(fields[19]) / _TICKS,
        )


def collect(services: Sequence[Service], ready: bool, service: str = SERVICE_NAME) -> Registry:
    """Everything `/metrics` shows, read now: `services`' health and counters, whether
    the process is `ready`, and the process itself; `service` names it in build info."""
    registry = Registry()
    registry.add(
        "iotmesh_build_info",
        "gauge",
        "Version of iotmesh and Python; instance is this process's id (also in run.json).",
        1,
        (
            ("version", __version__),
            ("python", platform.python_version()),
            ("service", service),
            ("instance", instance_id()),
        ),
    )
    registry.add("iotmesh_ready", "gauge", "1 when /readyz says ready, else 0.", int(ready))
    for one in services:
        registry.add(
            "iotmesh_service_healthy",
            "gauge",
            "1 when the service reports itself healthy (/healthz), else 0.",
            int(one.health().ok),
            (("service", one.name),),
        )
    for one in services:
        if isinstance(one, Singleton):
            registry.add(
                "iotmesh_leader",
                "gauge",
                "1 while this instance leads the singleton job (and runs it), else 0.",
                int(one.is_leader),
                (("job", one.job),),
            )
    for one in services:
        stats = one.stats()
        if stats:
            registry.add_stats(f"iotmesh_{one.name}", stats, one.stats_counters, one.stats_labels)
    add_process_metrics(registry)
    return registry


async def _maybe_admin(request: Request, ctx: Annotated[ApiContext, Depends(context)]) -> None:
    if ctx.settings.http.metrics_auth:
        await require_admin(request, ctx)


@router.get(
    "/metrics",
    response_class=Response,
    dependencies=[Depends(_maybe_admin)],
    responses={200: {"content": {CONTENT_TYPE: {}}}},
)
async def metrics(ctx: Annotated[ApiContext, Depends(context)]) -> Response:
    """Prometheus metrics of every service and of the process (no auth unless
    `http.metrics_auth`)."""
    registry = collect(ctx.services, not ctx.ready(), ctx.service)
    return Response(registry.render(), media_type=CONTENT_TYPE)
