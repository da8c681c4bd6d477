"""Service registry: instances announce themselves with a TTL heartbeat.

An instance writes its `Instance` record every `heartbeat_interval_s` with a TTL of
`ttl_s` (`Registration`, a Service: first write in `start`, delete in `stop`). The
engine deletes a record not rewritten within the TTL, so a crashed instance vanishes
from `list` by itself; readers that watch the heartbeats (`discovery.Discovery`) drop
it sooner, by phi-accrual failure detection.

Error handling: a failed heartbeat write is logged and retried at the next beat; the
registration reports itself unhealthy until a write succeeds again (if writes keep
failing for `ttl_s`, readers no longer see this instance, which is correct: nobody can
tell it from a dead one).

Resource handling: one named task per registration, cancelled in `stop`, which then
deletes the record (best effort: the TTL removes it anyway).
"""

from __future__ import annotations

import abc
import asyncio
import builtins
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable

import msgspec

from iotmesh.cluster.model import Instance, check_name
from iotmesh.core.clock import now_ms
from iotmesh.core.lifecycle import Health, Service

log = logging.getLogger(__name__)


class Registry(abc.ABC):
    """Where instances are registered; implemented on Redis, NATS KV and Kubernetes."""

    @abc.abstractmethod
    async def put(self, instance: Instance) -> None:
        """Write (or rewrite) the record, restarting its TTL."""

    @abc.abstractmethod
    async def remove(self, service: str, instance_id: str) -> None:
        """Delete the record at once (a clean stop)."""

    @abc.abstractmethod
    async def list(self, service: str | None = None) -> builtins.list[Instance]:
        """Every live record of `service` (of every service when None), sorted by key."""

    async def watch(
        self, service: str | None, interval: float
    ) -> AsyncIterator[builtins.list[Instance]]:
        """Yield the list now, then again whenever it changed (looked at every `interval` s).

        Every heartbeat changes a record (`seq`), so with instances registered this
        yields about once per heartbeat interval, or once per `interval` if longer.

        Polling rather than engine notifications: Redis keyspace events need server
        configuration, and one request per interval per watcher is cheap.
        """
        last: builtins.list[Instance] | None = None
        while True:
            current = await self.list(service)
            if current != last:
                last = current
                yield current
            await asyncio.sleep(interval)


class Registration(Service):
    """Keeps one instance registered while it runs; see the module docstring."""

    def __init__(
        self,
        registry: Registry,
        service: str,
        *,
        interval_s: float,
        addresses: list[str] | None = None,
        version: str = "",
        instance_id: str | None = None,
        metadata: dict[str, str] | None = None,
        load: Callable[[], float] | None = None,
        health: Callable[[], str] | None = None,
    ) -> None:
        self.name = f"registration.{check_name('service', service)}"
        self._registry = registry
        self._interval = interval_s
        self._load = load or (lambda: 0.0)
        self._health = health or (lambda: "ok")
        self.instance = Instance(
            service=service,
            instance_id=check_name("instance id", instance_id or uuid.uuid4().hex[:12]),
            addresses=list(addresses or []),
            version=version,
            started_ms=now_ms(),
            interval_s=interval_s,
            metadata=dict(metadata or {}),
        )
        self._task: asyncio.Task[None] | None = None
        self._ok = False
        self._beats = 0

    async def beat(self) -> None:
        """Write the record once, with a new `seq`, the current load and health."""
        self._beats += 1
        self.instance = msgspec.structs.replace(
            self.instance,
            seq=self._beats,
            heartbeat_ms=now_ms(),
            load=float(self._load()),
            health=self._health(),
        )
        await self._registry.put(self.instance)

    async def start(self) -> None:
        await self.beat()  # errors here fail start-up: the engine is unreachable
        self._ok = True
        self._task = asyncio.create_task(self._run(), name=self.name)

    async def _run(self) -> None:
        next_at = time.monotonic() + self._interval
        while True:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            # A late beat (a slow engine, a busy loop) does not cause a burst after it.
            next_at = max(next_at + self._interval, time.monotonic())
            try:
                await self.beat()
                self._ok = True
            except Exception:
                self._ok = False
                log.warning("%s: heartbeat failed", self.name, exc_info=True)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        try:
            await self._registry.remove(self.instance.service, self.instance.instance_id)
        except Exception:
            log.warning("%s: deregistering failed; the TTL will", self.name, exc_info=True)

    def health(self) -> Health:
        return Health(ok=self._ok, detail="" if self._ok else "heartbeat writes failing")

    def stats(self) -> dict[str, int]:
        return {"heartbeats": self._beats}
