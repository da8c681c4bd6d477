"""Registration's lifecycle over a registry double (engines: tests/contract/test_cluster.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from iotmesh.cluster import Instance, Registration
from tests.unit.cluster.test_discovery import FakeRegistry


class FlakyRegistry(FakeRegistry):
    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.writes = 0

    async def put(self, instance: Instance) -> None:
        if self.down:
            raise ConnectionError("engine down")
        self.writes += 1
        await super().put(instance)


async def until(predicate: Callable[[], bool], within: float = 5.0) -> None:
    async with asyncio.timeout(within):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def test_heartbeats_carry_load_and_health_and_failures_show_in_health() -> None:
    registry = FlakyRegistry()
    load = [3.0]
    reg = Registration(
        registry, "api", interval_s=0.02, load=lambda: load[0], health=lambda: "degraded"
    )
    async with reg:
        key = reg.instance.key
        assert registry.records[key].load == 3.0
        assert registry.records[key].health == "degraded"
        load[0] = 7.0
        await until(lambda: registry.records[key].load == 7.0)
        registry.down = True
        await until(lambda: not reg.health().ok)
        registry.down = False
        await until(lambda: reg.health().ok)
        assert registry.records[key].seq > 2
    assert key not in registry.records


async def test_start_fails_when_the_engine_is_unreachable() -> None:
    registry = FlakyRegistry()
    registry.down = True
    with pytest.raises(ConnectionError):
        await Registration(registry, "api", interval_s=1).start()
