"""SQLite time-series store: writes land as columnar batch rows, compaction turns them
into per-series chunks.

Schema (`schema.py`):

    ts_key     (id, key)                           key names, stored once
    ts_series  (id, entity_id, key_id)             one row per (device, key)
    ts_batch   (id, batch, min_sid, max_sid, min_ts, max_ts, n, columns...)
               index (max_sid, min_sid)            a write's points, ~256 per row
    ts_chunk   (id, series_id, min_ts, max_ts, n, kind, ts BLOB, vals BLOB)
               index (series_id, max_ts, min_ts, n)
    ts_latest  (series_id, ts, kind, value)        the newest point of each series
    ts_rollup, ts_rollup_state, ts_rollup_level, ts_expired
                                                   rollups and retention: `rollups.py`

Why it is fast. SQLite costs per row and per b-tree page touched, hardly per byte, so
points are stored many to a row, as packed arrays numpy reads without copying:

* A write transaction stores its points sorted by (series, ts), as columns, cut into
  rows of ~256 points at series boundaries (`batches.py`): ~50 row inserts for 12,000
  points, appended at the end of the table, built with whole-array numpy operations.
  The issue asked for one chunk row per series per write. Measured here (1000 devices
  x 3 keys, 8 consumers of 500 messages, so ~4 points per series per commit): that
  layout reached 65-75k points/s, little better than the ~55k of a row per point,
  because each commit then inserts 3000 rows and 3000 entries at random places of
  the chunk index. Batch rows cost the same whatever the number of series.
* Compaction turns batch rows into `ts_chunk` rows: per series, its points of one
  value kind (`chunks.py`: int64 ts; float64 / int64 / int8 / msgpack values), and
  merges a series' small chunks into chunks of up to `chunk_max_points` points
  (size-tiered, `compaction.py`). A compacted series of 1M points is ~250 rows; a
  range query finds the overlapping ones through the covering index, views their
  blobs with `np.frombuffer` and aggregates with numpy (`storage/aggregate.py`); one
  more indexed query finds the series' slices of batch rows not yet compacted. A
  `limit` query reads chunks from the `order` end only until the rest cannot change
  the answer, so "the newest 100 points" does not read the whole series.

Last write wins. A series' points are in write order: chunks by id (a new chunk gets
`max(id) + 1`; compaction gives merged chunks the ids of the chunks it merged, which
are contiguous in that order), then batch rows by id (always newer than every chunk,
as compaction takes the oldest batch rows first). A reader concatenates in that order,
stable-sorts by ts and keeps the last point of each ts; within one write the later
record wins when the batch rows are built. When the parts read do not overlap
(in-order data: the usual case), the merge is a concatenation, with no sort.

Compaction runs in the writer process, as steps between the writes
(`writes.py`): a step is due when 4 x `compact_min_chunks` writes wait in batch rows
(they are cheap to keep, and the more a step takes, the bigger the chunks it makes),
or a series has got `compact_min_chunks` new chunks. A step is one transaction, so it
never runs beside a write (SQLite has one writer anyway); it runs only while no write
waits, so a write waits at most for the one step in progress.
Merging chunks of one kind that do not overlap is a join of their blobs, no decoding.
The compaction state is in memory: after a restart, waiting batch rows are counted
again, and a series is looked at again once it gets new chunks; nothing is lost, only
merged later. A delete first compacts every batch row (in its own transaction), then
edits chunks in place, keeping their ids.

Rollups (`rollups.py`, upkeep as background steps of the writer process, like
compaction; `rollup_reads.py`, how an aggregation reads them) and retention
(`apply_retention`) are described in docs/storage.md, "Retention and rollups".

Latest values: `ts_latest` is updated in the write's transaction, only where the new
ts is >= the stored one, so `latest` and `keys` are one indexed join. A delete
recomputes it from the remaining chunk with the greatest `max_ts` (newest id on ties).

Processes, threads and durability. Writes, deletes and compaction run in a writer
process of their own that owns the write connection (`writer_process.py`: in the
server's process they shared the GIL with the event loop, and every SQLite call waited
for it); queries run on a small pool of reader threads of the server, each with its own
connection and one read transaction per query (`reads.py`), so they run while the
writer commits (WAL) and see whole commits only. WAL checkpoints run on a thread of the
writer process, at most once a second, not inside the writer's commits. `PRAGMA synchronous`
comes from settings: FULL (default) makes a commit survive power loss, NORMAL a process
crash. `secure_delete` is FAST: Debian builds SQLite with deleted content zeroed,
which would write every page a compaction frees a second time. SQLite errors are
raised as `StorageError`; values that cannot be stored (a ts outside int64) as
`PayloadError`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import msgspec

from iotmesh.core.errors import PayloadError, StorageError
from iotmesh.core.settings import SqliteSettings
from iotmesh.core.types import TsPoint, TsRecord
from iotmesh.storage import aggregate as agg
from iotmesh.storage.points import classify
from iotmesh.storage.rollup import RetentionPolicy
from iotmesh.storage.sqlite import reads, schema
from iotmesh.storage.sqlite.writer_client import WriterClient
from iotmesh.storage.sqlite.writer_process import connect
from iotmesh.storage.timeseries import Query, SeriesWrite

log = logging.getLogger(__name__)

T = TypeVar("T")
P = ParamSpec("P")

_READERS = 2  # reader threads; numpy releases the GIL, so two queries overlap
_batch = msgspec.msgpack.Encoder()


def _encode_batch(batch: Sequence[SeriesWrite]) -> bytes:
    """A write batch as the writer process reads it (MessagePack).

    MessagePack has no ints beyond 64 bits, and a few Python types (int or str
    subclasses) it does not know: such batches take the slow path, value by value
    through `classify`, which stores them as the store always has (big ints as doubles).

    Raises:
        PayloadError: a value or timestamp that cannot be stored at all.
    """
    try:
        return _batch.encode(batch)
    except (OverflowError, TypeError, msgspec.EncodeError):
        pass
    converted = [
        SeriesWrite(
            series.entity_id,
            [
                TsRecord(record.ts, {k: classify(v)[1] for k, v in record.values.items()})
                for record in series.records
            ],
        )
        for series in batch
    ]
    try:
        return _batch.encode(converted)
    except (OverflowError, TypeError, msgspec.EncodeError) as exc:
        raise PayloadError(f"a telemetry value or timestamp cannot be stored: {exc}") from exc


class SqliteTimeSeriesStore:
    """`TimeSeriesStore` on one SQLite file (see the module docstring).

    Resource handling: an async context manager, or `open` then `close`. `close` waits
    for the write in progress; compaction steps still queued are dropped (their data is
    already durable in batch rows or chunks).
    """

    def __init__(
        self, path: Path, settings: SqliteSettings, rollup_levels: Sequence[int] = ()
    ) -> None:
        self._path = path
        self._settings = settings
        self._levels = tuple(sorted(rollup_levels))
        self._reader_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._writer: WriterClient | None = None
        self._local = threading.local()
        self._reader_conns: list[sqlite3.Connection] = []
        self._reader_conns_lock = threading.Lock()

    # -- lifecycle -------------------------------------------------------------------

    async def open(self) -> None:
        """Start the writer process, which creates or upgrades the schema."""
        if self._reader_pool is not None:
            return
        self._reader_pool = concurrent.futures.ThreadPoolExecutor(
            _READERS, thread_name_prefix="tsdb-read"
        )
        self._writer = WriterClient(self._path, self._settings, self._levels)
        try:
            await self._writer.start()
        except BaseException:
            await self._shutdown()
            raise

    async def close(self) -> None:
        """Wait for the write in progress, drop queued compaction, close connections."""
        if self._reader_pool is None:
            return
        writer = self._writer
        try:
            if writer is not None:
                await writer.close()
        finally:
            await self._shutdown()

    async def _shutdown(self) -> None:
        pool, self._reader_pool = self._reader_pool, None
        writer, self._writer = self._writer, None
        if pool is not None:
            await asyncio.to_thread(pool.shutdown, True)
        if writer is not None:
            await writer.close()  # a no-op unless open failed midway
        with self._reader_conns_lock:
            for conn in self._reader_conns:
                conn.close()
            self._reader_conns.clear()
        self._local = threading.local()

    # -- running on the threads ------------------------------------------------------

    async def _on(
        self,
        pool: concurrent.futures.Executor | None,
        fn: Callable[P, T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        if pool is None:
            raise StorageError("time-series store is not open")
        loop = asyncio.get_running_loop()
        try:
            future = loop.run_in_executor(pool, lambda: fn(*args, **kwargs))
        except RuntimeError as exc:  # the pool was shut down: closed meanwhile
            raise StorageError("time-series store is closed") from exc
        try:
            return await future
        except sqlite3.Error as exc:
            raise StorageError(f"time-series store: {exc}") from exc

    async def _call(self, op: str, *args: Any) -> Any:
        """Run a write-side operation in the writer process (in submission order)."""
        writer = self._writer
        if writer is None:
            raise StorageError("time-series store is not open")
        return await writer.call(op, *args)

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect(self._path, self._settings.synchronous)
            conn.execute("PRAGMA query_only = 1")
            self._local.conn = conn
            with self._reader_conns_lock:
                self._reader_conns.append(conn)
        return conn

    # -- the TimeSeriesStore interface -----------------------------------------------

    async def write(self, batch: Sequence[SeriesWrite]) -> None:
        """Store every record of `batch` in one transaction; durable when it returns."""
        if batch:  # a batch without points commits nothing (the writer checks)
            await self._call("write", _encode_batch(batch))

    async def query(self, query: Query) -> dict[str, list[TsPoint]]:
        """Return the points (or aggregated buckets) of each key that has any."""
        agg.validate(query.start_ts, query.end_ts, query.agg, query.interval_ms, query.limit)
        if not query.keys:
            return {}
        return await self._on(
            self._reader_pool, lambda: reads.query(self._reader(), query, self._levels)
        )

    async def latest(self, entity_id: str, keys: Sequence[str] | None = None) -> dict[str, TsPoint]:
        """Return the newest point of each key; all keys when None."""
        rows = await self._on(
            self._reader_pool, lambda: reads.latest_rows(self._reader(), entity_id)
        )
        wanted = None if keys is None else set(keys)
        return {
            key: TsPoint(ts, schema.latest_value(kind, value))
            for key, ts, kind, value in rows
            if wanted is None or key in wanted
        }

    async def keys(self, entity_id: str) -> list[str]:
        """Return the sorted keys the entity has data for."""
        rows = await self._on(
            self._reader_pool, lambda: reads.latest_rows(self._reader(), entity_id)
        )
        return sorted(row[0] for row in rows)

    async def delete(self, entity_id: str, keys: Sequence[str], start_ts: int, end_ts: int) -> int:
        """Delete points with start_ts <= ts <= end_ts; return how many were deleted."""
        if start_ts > end_ts or not keys:
            return 0
        deleted: int = await self._call("delete", entity_id, list(keys), start_ts, end_ts)
        return deleted

    async def delete_entity(self, entity_id: str) -> None:
        """Delete every series of the entity."""
        await self._call("delete_entity", entity_id)

    # -- beyond the interface --------------------------------------------------------

    async def apply_retention(self, policy: RetentionPolicy) -> None:
        """Start deleting what `policy` says has expired (see `rollups.py`).

        Returns once the pass is planned; the deletes run as background steps of the
        writer process, between writes (`compact` waits for them).
        """
        await self._call("retention", msgspec.msgpack.encode(policy))

    async def compact(self) -> int:
        """Run all compaction that is due now, to the end; return the merges done.

        Compaction runs by itself between writes; benchmarks and tests call this to
        reach the settled state.
        """
        merged: int = await self._call("compact")
        return merged
