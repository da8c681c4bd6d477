"""Everything that runs on the writer thread: writes, deletes and compaction.

`SeriesWriter` owns the write connection and is only ever called from the store's
single writer thread, so its caches (series ids) and compaction bookkeeping need no
locks. Each public method is one transaction, rolled back as a whole on error.
"""

from __future__ import annotations

import collections
import logging
import math
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import msgspec
import numpy as np

from iotmesh.core.errors import PayloadError
from iotmesh.storage.points import Kind, merge
from iotmesh.storage.rollup import RetentionPolicy
from iotmesh.storage.sqlite import chunks as chunking
from iotmesh.storage.sqlite import schema
from iotmesh.storage.sqlite.batches import GROUP_SHIFT, LatestRow, encode_batch, to_chunks
from iotmesh.storage.sqlite.compaction import ChunkMeta, plan
from iotmesh.storage.sqlite.rollups import RollupKeeper
from iotmesh.storage.timeseries import SeriesWrite

log = logging.getLogger(__name__)

_STEP_BUDGET_S = 0.004  # longest compaction step, so that a queued write waits at most that
_SERIES_PER_TXN = 16  # series merged per compaction transaction
_PARTS_PER_TXN = 4096  # batch rows moved into chunks per statement of `_flush_all`
_GROUPS_PER_STEP = 1  # series groups a flush step moves (256 series: a few ms)
_FLUSH_CHUNKS = 8  # a flush pass waits for this many full chunks' worth of points...
_MAX_PENDING_BATCHES = 512  # ...or for this many write transactions, whichever is first
_MAX_CACHED_SERIES = 1_000_000  # bound on the series-id cache (~100 B an entry)
_LATEST_JSON = msgspec.json.Encoder()


class ChunkLimits(Protocol):
    """What the writer needs of `SqliteSettings` (a Protocol, so the writer process
    does not import pydantic and the settings machinery: that is 14 MB of RSS)."""

    @property
    def chunk_max_points(self) -> int: ...

    @property
    def compact_min_chunks(self) -> int: ...


def _not_finite(value: Any) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


class SeriesWriter:
    """The write side of the store (see the module docstring of `tsdb.py`).

    Args:
        conn: the write connection, used from the writer thread only.
        settings: chunk size and compaction threshold.
        submit: queues a callable on the writer thread (behind pending writes).
        committed: called after each commit (the store then checkpoints the WAL).
        rollup_levels: bucket widths (ms) of the rollups to keep (`rollups.py`).
    """

    def __init__(
        self,
        conn: sqlite3.Connection,
        settings: ChunkLimits,
        submit: Callable[[Callable[[], None]], object],
        committed: Callable[[], None],
        rollup_levels: Sequence[int] = (),
    ) -> None:
        self._db = conn
        self._settings = settings
        self._submit = submit
        self._committed = committed
        # When a flush pass starts (`_flush_due`). Batch rows are cheap to keep (a
        # query picks the rows holding its series in one vectorised pass), and the
        # more points a flush takes, the bigger the chunks it makes and the fewer
        # merges follow: at a few thousand records a second, flushing every 32 small
        # commits made chunks of about one point each, which merges then rewrote again
        # and again (65% of the writer process's time). So a pass waits for points
        # enough to fill `_FLUSH_CHUNKS` chunks, with a bound on the rows a query of
        # recent points must look through.
        self._flush_rows = 4 * settings.compact_min_chunks
        self._flush_points = _FLUSH_CHUNKS * settings.chunk_max_points
        self._series_ids: dict[str, dict[str, int]] = {}
        self._cached_series = 0
        self._key_ids: dict[str, int] = {}
        self._batches, self._points = self._pending_batches()
        (self._next_batch,) = conn.execute(
            "SELECT coalesce(max(batch), 0) + 1 FROM ts_batch"
        ).fetchone()
        self._new_chunks: dict[int, int] = {}  # series -> chunks made since its last merge
        self._to_merge: dict[int, None] = {}  # an ordered set of series ids
        # A flush pass: the series groups still to move, and the newest batch row it takes.
        self._pass: collections.deque[int] = collections.deque()
        self._pass_upto = 0
        self._step_queued = False
        self.closing = False
        # Asked between the transactions of a compaction step: True stops the step
        # there (the writer process says whether a request is waiting), so a write
        # waits for at most one compaction transaction, not for a whole step.
        self.interrupted: Callable[[], bool] = lambda: False
        (self._synchronous,) = conn.execute("PRAGMA synchronous").fetchone()
        self._rollups = RollupKeeper(conn, rollup_levels, self._delete_series)
        self._transaction(self._rollups.start)
        if self._has_unaligned_rows():
            # Rows written before parts were cut at group boundaries: moved all at once.
            self._transaction(self._flush_all)
        self._schedule()

    def close(self) -> None:
        """Close the connection; queued compaction steps then do nothing."""
        self.closing = True
        self._db.close()

    def _has_unaligned_rows(self) -> bool:
        row = self._db.execute(
            f"SELECT 1 FROM ts_batch WHERE (min_sid >> {GROUP_SHIFT}) != (max_sid >> {GROUP_SHIFT})"
            " LIMIT 1"
        ).fetchone()
        return row is not None

    def _pending_batches(self) -> tuple[int, int]:
        """Write transactions whose batch rows are not yet turned into chunks, and
        the points those rows hold."""
        count, points = self._db.execute(
            "SELECT count(DISTINCT batch), coalesce(sum(n), 0) FROM ts_batch"
        ).fetchone()
        return int(count), int(points)

    def _flush_due(self) -> bool:
        """Whether enough batch rows wait for a flush pass (see `__init__`)."""
        if self._batches < self._flush_rows:
            return False
        return self._points >= self._flush_points or self._batches >= _MAX_PENDING_BATCHES

    def _transaction(self, body: Callable[[], Any]) -> Any:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            result = body()
            db.execute("COMMIT")
            self._committed()
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
                # The body may have counted batch rows as moved that now are not.
                self._batches, self._points = self._pending_batches()
                rollups: RollupKeeper | None = getattr(self, "_rollups", None)
                if rollups is not None:
                    rollups.rolled_back()
            raise
        return result

    # -- writes ----------------------------------------------------------------------

    def write(self, batch: Sequence[SeriesWrite]) -> None:
        """Store `batch` as batch rows and update latest values, in one transaction."""
        added: list[tuple[str, str]] = []
        try:
            stored: int = self._transaction(lambda: self._write(batch, added))
        except BaseException:
            for entity, key in added:  # ids of series that were rolled back
                self._series_ids[entity].pop(key, None)
            self._key_ids.clear()
            raise
        self._cached_series += len(added)
        if self._cached_series > _MAX_CACHED_SERIES:
            self._series_ids.clear()
            self._cached_series = 0
        if stored:
            self._batches += 1
            self._points += stored
            self._next_batch += 1
            self._schedule()

    def _write(self, batch: Sequence[SeriesWrite], added: list[tuple[str, str]]) -> int:
        """The body of `write`; returns the points stored (0: nothing to write)."""
        sids: list[int] = []
        values: list[Any] = []
        stamps: list[int] = []
        counts: list[int] = []
        # The loop runs once per record: bound methods, no per-point Python work.
        add_sids, add_values = sids.extend, values.extend
        add_stamp, add_count = stamps.append, counts.append
        cache = self._series_ids
        for series in batch:
            entity = series.entity_id
            ids = cache.get(entity)
            if ids is None:
                ids = cache[entity] = {}
            lookup = ids.__getitem__
            for record in series.records:
                record_values = record.values
                mark = len(sids)
                try:
                    add_sids(map(lookup, record_values))
                except KeyError:
                    del sids[mark:]
                    add_sids(self._ids_of(entity, ids, record_values, added))
                add_values(record_values.values())
                add_stamp(record.ts)
                add_count(len(record_values))
        if not sids:
            return 0
        try:
            ts = np.repeat(np.array(stamps, np.int64), counts)
            rows, latest = encode_batch(sids, ts, values)
        except (OverflowError, TypeError, msgspec.EncodeError) as exc:
            raise PayloadError(f"a telemetry value or timestamp cannot be stored: {exc}") from exc
        batch_no = self._next_batch
        self._db.executemany(
            schema.INSERT_BATCH,
            [
                (
                    batch_no,
                    r.min_sid,
                    r.max_sid,
                    r.min_ts,
                    r.max_ts,
                    r.n,
                    r.sids,
                    r.starts,
                    r.ts,
                    r.kinds,
                    r.doubles,
                    r.longs,
                    r.objects,
                )
                for r in rows
            ],
        )
        self._upsert_latest(latest)
        return sum(r.n for r in rows)

    def _upsert_latest(self, latest: list[LatestRow]) -> None:
        """Upsert the latest values in one statement (see `schema.UPSERT_LATEST_JSON`).

        JSON has no NaN or infinity: a write holding one takes the row-by-row path."""
        rows = _LATEST_JSON.encode(latest)
        if b"null" in rows and any(_not_finite(row[3]) for row in latest):
            self._db.executemany(schema.UPSERT_LATEST, latest)
        else:
            self._db.execute(schema.UPSERT_LATEST_JSON, (rows,))

    def _ids_of(
        self,
        entity: str,
        ids: dict[str, int],
        keys: Iterable[str],
        added: list[tuple[str, str]],
    ) -> list[int]:
        """The series ids of `keys` of `entity`, creating the missing series."""
        out = []
        for key in keys:
            sid = ids.get(key)
            if sid is None:
                sid = ids[key] = self._create_series(entity, key)
                added.append((entity, key))
            out.append(sid)
        return out

    def _create_series(self, entity: str, key: str) -> int:
        """The id of a series not in the cache: looked up, or inserted."""
        db = self._db
        kid = self._key_ids.get(key)
        if kid is None:
            row = db.execute("SELECT id FROM ts_key WHERE key = ?", (key,)).fetchone()
            if row is None:
                row = db.execute(
                    "INSERT INTO ts_key (key) VALUES (?) RETURNING id", (key,)
                ).fetchone()
            kid = self._key_ids[key] = int(row[0])
        row = db.execute(
            "SELECT id FROM ts_series WHERE entity_id = ? AND key_id = ?", (entity, kid)
        ).fetchone()
        if row is None:
            row = db.execute(
                "INSERT INTO ts_series (entity_id, key_id) VALUES (?, ?) RETURNING id",
                (entity, kid),
            ).fetchone()
        return int(row[0])

    # -- deletes ---------------------------------------------------------------------

    def delete(self, entity_id: str, keys: Sequence[str], start_ts: int, end_ts: int) -> int:
        """Delete points of some keys in a range; return how many were deleted."""
        result: int = self._transaction(lambda: self._delete(entity_id, keys, start_ts, end_ts))
        return result

    def _delete(self, entity_id: str, keys: Sequence[str], start_ts: int, end_ts: int) -> int:
        # Batch rows hold many series; rather than rewrite them, move everything into
        # chunks first (rare: deletes are rare), then delete from chunks only.
        self._flush_all()
        deleted = 0
        for key in dict.fromkeys(keys):
            row = self._db.execute(schema.SERIES_ID, (entity_id, key)).fetchone()
            if row is not None:
                sid = int(row[0])
                gone = self._delete_series(sid, start_ts, end_ts)
                self._rollups.lowered(sid, start_ts, end_ts, raw_deleted=gone > 0)
                deleted += gone
        return deleted

    def _delete_series(self, sid: int, start_ts: int, end_ts: int) -> int:
        db = self._db
        metas = db.execute(schema.CHUNK_META, (sid, start_ts, end_ts)).fetchall()
        gone: set[int] = set()
        for cid, kind, ts_blob, vals in schema.fetch_chunks(db, [m[0] for m in metas]):
            points = chunking.decode(kind, ts_blob, vals)
            inside = (points.ts >= start_ts) & (points.ts <= end_ts)
            if not inside.any():
                continue
            gone.update(points.ts[inside].tolist())
            if inside.all():
                db.execute("DELETE FROM ts_chunk WHERE id = ?", (cid,))
                continue
            # Rewritten in place (same id), so its points keep their write order.
            keep = points.take(np.flatnonzero(~inside))
            c = chunking.encode_run(keep, Kind(kind), 0, len(keep))
            db.execute(
                "UPDATE ts_chunk SET min_ts = ?, max_ts = ?, n = ?, ts = ?, vals = ? WHERE id = ?",
                (c.min_ts, c.max_ts, c.n, c.ts, c.vals, cid),
            )
        if gone:
            self._recompute_latest(sid)
        return len(gone)

    def _recompute_latest(self, sid: int) -> None:
        row = self._db.execute(
            "SELECT kind, ts, vals FROM ts_chunk WHERE series_id = ?1 AND max_ts ="
            " (SELECT max(max_ts) FROM ts_chunk WHERE series_id = ?1) ORDER BY id DESC LIMIT 1",
            (sid,),
        ).fetchone()
        if row is None:
            self._db.execute("DELETE FROM ts_latest WHERE series_id = ?", (sid,))
            return
        points = chunking.decode(*row)
        (value,) = points.values(len(points) - 1)
        kind = int(points.kinds[-1])
        self._db.execute(
            "INSERT OR REPLACE INTO ts_latest (series_id, ts, kind, value) VALUES (?, ?, ?, ?)",
            (sid, int(points.ts[-1]), kind, schema.latest_param(kind, value)),
        )

    def delete_entity(self, entity_id: str) -> None:
        """Delete every series of an entity."""
        sids: list[int] = self._transaction(lambda: self._delete_entity(entity_id))
        cached = self._series_ids.pop(entity_id, None)
        self._cached_series -= 0 if cached is None else len(cached)
        for sid in sids:
            self._new_chunks.pop(sid, None)
            self._to_merge.pop(sid, None)

    def _delete_entity(self, entity_id: str) -> list[int]:
        self._flush_all()
        db = self._db
        rows = db.execute("SELECT id FROM ts_series WHERE entity_id = ?", (entity_id,))
        sids = [int(row[0]) for row in rows]
        db.executemany("DELETE FROM ts_chunk WHERE series_id = ?", [(s,) for s in sids])
        db.executemany("DELETE FROM ts_latest WHERE series_id = ?", [(s,) for s in sids])
        db.execute("DELETE FROM ts_series WHERE entity_id = ?", (entity_id,))
        self._rollups.forget(sids)
        return sids

    # -- compaction ------------------------------------------------------------------

    def _schedule(self) -> None:
        """Queue a compaction step behind pending writes, if there is work and none is."""
        due = (
            self._flush_due()
            or self._pass
            or self._to_merge
            or self._rollups.due
            or self._rollups.retention_pending
        )
        if due and not self._step_queued and not self.closing:
            self._step_queued = True
            self._submit(self._step)

    def _step(self) -> None:
        """One compaction step of at most about `_STEP_BUDGET_S`, ended early when
        `interrupted` says a request waits.

        Its transactions commit with `synchronous = NORMAL`: no fsync of their own
        (~3 ms each on a VM disk, which a write arriving meanwhile waited for). That
        loses no durability: compaction only moves points the store already holds, in
        atomic transactions, and the next write's FULL commit syncs the WAL with every
        frame before its own; a power loss before that rolls a step back, whole, and
        the points are still where it found them.
        """
        self._step_queued = False
        if self.closing:
            return
        deadline = time.perf_counter() + _STEP_BUDGET_S
        if self._synchronous > 1:
            self._db.execute("PRAGMA synchronous = NORMAL")
        try:
            self._compact_until(deadline)
        except sqlite3.Error as exc:
            # Nothing is lost: the rows stay as they were; the next write queues a retry.
            log.warning("time-series compaction failed: %s", exc)
            return
        except Exception:
            # Nobody awaits this step: log here, or the error would vanish with its future.
            log.exception("time-series compaction failed")
            return
        finally:
            if self._synchronous > 1 and not self.closing:
                self._db.execute(f"PRAGMA synchronous = {self._synchronous}")
        self._schedule()

    def _compact_until(self, deadline: float) -> None:
        """The transactions of one step: a flush of a few groups, merges, rollups."""

        def go_on() -> bool:
            return time.perf_counter() < deadline and not self.interrupted()

        if not self._pass and self._flush_due():
            self._start_pass()
        if self._pass:
            self._transaction(self._flush_groups)
        while self._to_merge and go_on():
            self._merge_some()
        # Rollups and retention after compaction, in what is left of the budget:
        # under sustained load they wait for a quieter moment (queries read raw
        # points where rollups lag, so nothing is wrong meanwhile, only slower).
        rollups = self._rollups
        while go_on() and (rollups.retention_pending or rollups.due):
            if rollups.retention_pending:
                self._transaction(rollups.retention_step)
            else:
                self._transaction(lambda: rollups.roll_next(force=False, deadline=deadline))

    def compact_all(self) -> int:
        """Turn every batch row into chunks and merge every series due; return merges."""
        self._transaction(self._flush_all)
        merged = 0
        while self._to_merge:
            merged += self._merge_some()
        rollups = self._rollups
        while rollups.retention_pending:
            self._transaction(rollups.retention_step)
        self._transaction(rollups.start)  # every series: those waiting for closed buckets too
        while rollups.due:
            self._transaction(lambda: rollups.roll_next(force=True))
        return merged

    def start_retention(self, policy: RetentionPolicy) -> None:
        """Begin a retention pass; it runs as background steps (`compact_all` finishes it)."""

        def start() -> None:
            self._flush_all()  # points still in batch rows expire in this pass too
            self._rollups.start_retention(policy)

        self._transaction(start)
        self._schedule()

    def _flush_all(self) -> None:
        """Move every batch row into chunks (before a delete, or when asked to)."""
        db = self._db
        self._pass.clear()
        while True:
            rows = db.execute(
                f"SELECT id, {schema.BATCH_COLUMNS} FROM ts_batch ORDER BY id LIMIT ?",
                (_PARTS_PER_TXN,),
            ).fetchall()
            if not rows:
                break
            self._move(rows)
            db.execute("DELETE FROM ts_batch WHERE id <= ?", (rows[-1][0],))
        self._batches = self._points = 0

    def _start_pass(self) -> None:
        """Plan a flush pass: the groups that have batch rows, up to the newest row now.

        The pass then moves a few groups per step (`_flush_groups`), each step a short
        transaction between writes; rows written meanwhile wait for the next pass.
        """
        (upto,) = self._db.execute("SELECT max(id) FROM ts_batch").fetchone()
        self._batches = self._points = 0
        if upto is None:
            return
        groups = self._db.execute(
            f"SELECT DISTINCT max_sid >> {GROUP_SHIFT} FROM ts_batch WHERE id <= ? ORDER BY 1",
            (upto,),
        ).fetchall()
        self._pass.extend(int(g) for (g,) in groups)
        self._pass_upto = int(upto)

    def _flush_groups(self) -> None:
        """Move the batch rows of the pass's next `_GROUPS_PER_STEP` groups into chunks.

        A group's rows hold only its series, and are taken in id (write) order, up to
        the pass's newest row: each series' moved points are older than those it keeps
        in batch rows, and chunks keep being older than batch rows, series by series.
        """
        db = self._db
        rows: list[Any] = []
        spans = []
        for _ in range(min(_GROUPS_PER_STEP, len(self._pass))):
            lo = self._pass.popleft() << GROUP_SHIFT
            span = (lo, lo + (1 << GROUP_SHIFT) - 1, self._pass_upto)
            spans.append(span)
            rows += db.execute(
                f"SELECT id, {schema.BATCH_COLUMNS} FROM ts_batch"
                " WHERE max_sid BETWEEN ? AND ? AND id <= ? ORDER BY id",
                span,
            ).fetchall()
        if rows:
            self._move(rows)
            db.executemany("DELETE FROM ts_batch WHERE max_sid BETWEEN ? AND ? AND id <= ?", spans)

    def _move(self, rows: list[Any]) -> None:
        """Insert the chunks of batch rows (id first, then `BATCH_COLUMNS`, id order)."""
        made = to_chunks([row[1:] for row in rows], self._settings.chunk_max_points)
        self._db.executemany(
            schema.INSERT_CHUNK,
            [(None, s, c.min_ts, c.max_ts, c.n, c.kind, c.ts, c.vals) for s, c in made],
        )
        self._count_chunks([s for s, _ in made])
        spans: dict[int, tuple[int, int]] = {}
        for sid, c in made:
            lo, hi = spans.get(sid, (c.min_ts, c.max_ts))
            spans[sid] = (min(lo, c.min_ts), max(hi, c.max_ts))
        self._rollups.moved((sid, lo, hi) for sid, (lo, hi) in spans.items())

    def _count_chunks(self, sids: list[int]) -> None:
        threshold = self._settings.compact_min_chunks
        new_chunks = self._new_chunks
        for sid in sids:
            count = new_chunks.get(sid, 0) + 1
            new_chunks[sid] = count
            if count >= threshold:
                self._to_merge[sid] = None

    def _merge_some(self) -> int:
        """Merge the small chunks of up to `_SERIES_PER_TXN` due series, in one transaction.

        The statements are shared by all those series (one select of chunk metadata,
        one fetch of the blobs, one delete, one insert): per-statement overhead, not
        per-row work, is what a merge of a few small chunks mostly costs.
        """
        sids = list(self._to_merge)[:_SERIES_PER_TXN]
        for sid in sids:
            del self._to_merge[sid]
            self._new_chunks.pop(sid, None)
        merged: int = self._transaction(lambda: self._merge_series(sids))
        return merged

    def _merge_series(self, sids: list[int]) -> int:
        db = self._db
        max_points = self._settings.chunk_max_points
        marks = ",".join("?" * len(sids))
        metas: dict[int, list[ChunkMeta]] = {sid: [] for sid in sids}
        for sid, *meta in db.execute(
            "SELECT series_id, id, n, kind, min_ts, max_ts FROM ts_chunk"
            f" WHERE series_id IN ({marks}) ORDER BY series_id, id",
            sids,
        ):
            metas[sid].append(ChunkMeta(*meta))
        groups = [
            (sid, ids)
            for sid in sids
            for ids in plan(metas[sid], max_points, self._settings.compact_min_chunks)
        ]
        if not groups:
            return 0
        blobs = {
            row[0]: row[1:]
            for row in schema.fetch_chunks(db, [i for _, ids in groups for i in ids])
        }
        by_id = {m.id: m for sid, _ in groups for m in metas[sid]}
        inserts: list[tuple[Any, ...]] = []
        for sid, ids in groups:
            group = [by_id[i] for i in ids]
            out = chunking.concat_chunks(group, [blobs[i][1:] for i in ids], max_points)
            if out is None:  # overlapping, or of several kinds: decode, sort, encode
                points = merge([chunking.decode(*blobs[i]) for i in ids])
                out = chunking.encode_points(points, max_points)
            reuse = ids[len(ids) - len(out) :]  # ids stay in the merged run's id range
            inserts.extend(
                (cid, sid, c.min_ts, c.max_ts, c.n, c.kind, c.ts, c.vals)
                for cid, c in zip(reuse, out, strict=True)
            )
        db.executemany("DELETE FROM ts_chunk WHERE id = ?", [(i,) for i in blobs])
        db.executemany(schema.INSERT_CHUNK, inserts)
        return len(groups)
