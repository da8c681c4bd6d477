"""Test doubles shared by unit tests: a store that records what it is asked to write.

Used where the unit under test is the queueing logic in front of a store (the writer,
the pipeline); the real stores are tested against real databases in tests/contract.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from iotmesh.core.errors import StorageError
from iotmesh.core.types import TsPoint
from iotmesh.storage.rollup import RetentionPolicy
from iotmesh.storage.timeseries import Query, SeriesWrite


class RecordingStore:
    """Records each `write` (and `apply_retention`) call; can hold commits open and fail
    the next few writes."""

    def __init__(self, *, failures: int = 0, always_fail: bool = False) -> None:
        self.writes: list[list[SeriesWrite]] = []
        self.calls = 0
        self.failures = failures
        self.always_fail = always_fail
        self.gate = asyncio.Event()
        self.gate.set()
        self.in_write = asyncio.Event()
        self.on_write: Callable[[], None] | None = None
        self.policies: list[RetentionPolicy] = []

    def entities(self) -> list[str]:
        """Entity ids in the order they were committed."""
        return [series.entity_id for batch in self.writes for series in batch]

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def write(self, batch: Sequence[SeriesWrite]) -> None:
        self.calls += 1
        if self.on_write is not None:
            self.on_write()
        self.in_write.set()
        await self.gate.wait()
        if self.always_fail or self.failures > 0:
            self.failures -= 1
            raise StorageError("disk full")
        self.writes.append(list(batch))

    async def query(self, query: Query) -> dict[str, list[TsPoint]]:
        raise NotImplementedError

    async def latest(self, entity_id: str, keys: Sequence[str] | None = None) -> dict[str, TsPoint]:
        raise NotImplementedError

    async def keys(self, entity_id: str) -> list[str]:
        raise NotImplementedError

    async def delete(self, entity_id: str, keys: Sequence[str], start_ts: int, end_ts: int) -> int:
        raise NotImplementedError

    async def delete_entity(self, entity_id: str) -> None:
        raise NotImplementedError

    async def apply_retention(self, policy: RetentionPolicy) -> None:
        self.policies.append(policy)
