"""The lifecycle every service implements: start, stop, health.

A service is an async context manager: `async with service:` starts it and stops it on
the way out, so the all-in-one process is an `AsyncExitStack` of services and a
microservice is the same code with fewer of them. `start` returns once the service is
ready (ports bound, schema created); long-running work goes into tasks the service owns
and cancels or drains in `stop`.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
from collections.abc import Mapping
from types import TracebackType
from typing import Any, ClassVar, Self

import msgspec


class Health(msgspec.Struct, frozen=True):
    """A service's own view of whether it can do its job."""

    ok: bool
    detail: str = ""


class Service(abc.ABC):
    """Base class of every long-lived part of the platform."""

    name: str = "service"

    stats_counters: ClassVar[frozenset[str]] = frozenset()
    """Keys of `stats()` whose values only ever grow: Prometheus counters on `/metrics`
    (with a `_total` suffix). The other keys are gauges."""

    stats_labels: ClassVar[Mapping[str, str]] = {}
    """For a `stats()` value that is a list or dict: the label its index or key becomes
    on `/metrics` (e.g. `{"messages_in": "qos"}`)."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Acquire resources and start background tasks; return when ready."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Finish or hand back in-flight work, then release resources."""

    def health(self) -> Health:
        """Report readiness; the default says a started service is healthy."""
        return Health(ok=True)

    def stats(self) -> dict[str, Any]:
        """Counters and gauges of this service (JSON values); the default has none.

        Read by `GET /api/v1/stats` and `iotmesh stats`; the observability work turns
        the same numbers into Prometheus metrics."""
        return {}

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


async def cancel_task(task: asyncio.Task[Any] | None) -> None:
    """Cancel a service's background task and wait until it has finished (None: none).

    The usual end of a `stop`: the task's own `finally` blocks run before this returns,
    so nothing of the service is still running when the caller goes on.
    """
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
