"""The time-series store interface every backend implements.

A backend holds, per entity (a device id) and key, a series of (ts, value) points.
Values keep their type: double, long, bool, string or JSON, as the device sent them.
Writing the same (entity, key, ts) again replaces the earlier value, like ThingsBoard.

Aggregation (`AVG`, `MIN`, `MAX`, `SUM`) reads numeric points (long and double; bools,
strings and JSON are skipped); `COUNT` counts every point. Buckets are aligned to
multiples of `interval_ms` since the Unix epoch, so results line up with rollups; a
bucket's point carries the bucket's start as its `ts`. `AVG` gives a double; `MIN`,
`MAX` and `SUM` give a long when every point in the bucket is a long.

The contract every backend must pass is tests/contract/test_timeseries.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import msgspec

from iotmesh.core.types import Aggregation, Order, TsPoint, TsRecord

if TYPE_CHECKING:
    from iotmesh.storage.rollup import RetentionPolicy


class SeriesWrite(msgspec.Struct, gc=False):
    """The records of one entity in a write batch."""

    entity_id: str
    records: list[TsRecord]


class Query(msgspec.Struct, frozen=True):
    """A range query over some keys of one entity.

    `start_ts` and `end_ts` are inclusive Unix milliseconds. With `agg` other than NONE,
    `interval_ms` is the bucket width and `limit` caps the number of buckets per key;
    with NONE, `limit` caps the number of points per key, taken from the `order` end.
    """

    entity_id: str
    keys: tuple[str, ...]
    start_ts: int
    end_ts: int
    agg: Aggregation = Aggregation.NONE
    interval_ms: int = 0
    limit: int = 100
    order: Order = Order.DESC


class TimeSeriesStore(Protocol):
    """Durable storage of telemetry series.

    Resource handling: `open` must be awaited before use and `close` after; `close`
    waits for any write in progress. A `write` call is one transaction: when it
    returns, every point in it is durable; when it raises, none is.
    """

    async def open(self) -> None:
        """Create or open the storage (schema, files, connections)."""

    async def close(self) -> None:
        """Release every resource; pending compaction work may be dropped, data not."""

    async def write(self, batch: Sequence[SeriesWrite]) -> None:
        """Store every record of `batch` in one transaction; durable when it returns.

        Raises:
            StorageError: the backend failed; nothing of the batch was stored.
        """

    async def query(self, query: Query) -> dict[str, list[TsPoint]]:
        """Return the points (or aggregated buckets) of each key that has any."""

    async def latest(self, entity_id: str, keys: Sequence[str] | None = None) -> dict[str, TsPoint]:
        """Return the newest point (largest ts) of each key; all keys when None."""

    async def keys(self, entity_id: str) -> list[str]:
        """Return the sorted keys the entity has data for."""

    async def delete(self, entity_id: str, keys: Sequence[str], start_ts: int, end_ts: int) -> int:
        """Delete points with start_ts <= ts <= end_ts; return how many were deleted.

        The latest value of a key is recomputed from what remains.
        """

    async def delete_entity(self, entity_id: str) -> None:
        """Delete every series of the entity (the device was deleted)."""

    async def apply_retention(self, policy: RetentionPolicy) -> None:
        """Delete raw points (and rollup buckets) that `policy` says have expired.

        May return before the deletes are done (SQLite runs them in the background).
        Rollups, where the backend keeps them, are brought up to date before the raw
        points they summarize go, so aggregates keep answering for the expired range.
        """
