"""Rollup upkeep and retention in the writer process: background steps, like compaction.

Rollups are never touched by a write's commit. They follow the chunks:

* When compaction moves batch rows into chunks (`moved`), each series' new points are
  compared with its rollup watermark `lo` per level (`ts_rollup_state`: every bucket
  before `lo` is rolled up). In-order points (ts >= lo, the usual case) cost a dict
  lookup; a late or rewritten point, or a delete (`lowered`), moves `lo` back to its
  bucket, in the same transaction as the chunk change, so a reader never uses a stale
  bucket.
* A series is *due* once a level has closed buckets to roll up: the bucket holding
  its newest chunk point is still open (more points will come) and is not rolled up,
  except by `compact_all` (benchmarks, tests) and before raw points expire. Small
  levels wait until `_span` of closed buckets have piled up (15 minutes, or 16
  buckets of a level finer than a minute, or one bucket of a coarser level), so that a busy
  series costs one step per quarter hour, not one per minute.
* A step (`roll_next`, one transaction) recomputes buckets [lo, hi) of one series from
  its chunks (last write wins, as for queries), at most `_POINTS_PER_STEP` raw points,
  replaces them in `ts_rollup` and advances `lo`. Rolling up from raw points, rather
  than adding new points to stored buckets, is what keeps late points, rewrites of a
  ts and deletes exact: a bucket is always the aggregate of what the chunks hold.
* Points still in batch rows are not read: when they are moved their ts is checked
  against `lo` like any other, and until then a reader computes their bucket from
  raw points.

Retention (`start_retention`, then `retention_step`s): per series, raw points older
than the policy's cutoff are first rolled up (forced, through the cutoff), then deleted
from the chunks, without moving `lo`: the rollups keep the expired range's
aggregates. The cutoff is aligned down to the coarsest level, so no bucket is half
expired, and recorded per series (`ts_expired`): no watermark moves below it again,
since the buckets before it cannot be recomputed. A point that arrives already older
than its raw TTL is therefore left out of the rollups (the next pass deletes it); a
delete of an expired range deletes the buckets it covers whole. Rollup buckets of each
level are deleted a block at a time once the whole block is older than the level's TTL.

State after a restart: every series is due once (a cheap check each), so nothing a
crash interrupted is left behind; a level no longer configured is dropped, so one
added back later is rebuilt rather than trusted.
"""

from __future__ import annotations

import collections
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from iotmesh.storage import rollup
from iotmesh.storage.points import INT64_MIN, merge
from iotmesh.storage.rollup import RetentionPolicy
from iotmesh.storage.sqlite import chunks as chunking
from iotmesh.storage.sqlite import schema

log = logging.getLogger(__name__)

_POINTS_PER_STEP = 8192  # raw points a background rollup step reads (~1-2 ms)
_POINTS_PER_FORCED_STEP = 65_536  # ... and one of `compact_all` (nobody waits)
_MIN_SPAN_MS = 15 * 60_000  # closed buckets a level waits for before it is due
_SERIES_PER_STEP = 16  # series a rollup step (one transaction) may take


def _span(size: int) -> int:
    """The closed buckets (ms) a level waits for before a background step rolls them."""
    return max(size, min(_MIN_SPAN_MS, 16 * size))


_MAX_CACHED = 1_000_000  # (series -> watermarks) entries kept in memory
_B = schema.ROLLUP_BLOCK


class RollupKeeper:
    """The rollup and retention side of `writes.SeriesWriter` (same connection, same
    thread; every method runs inside a transaction the caller opened).

    Args:
        conn: the write connection.
        levels: bucket widths in ms, of the configured levels.
        delete_raw: deletes a series' chunk points in [start, end] (and recomputes its
            latest value), without touching rollups.
    """

    def __init__(
        self,
        conn: sqlite3.Connection,
        levels: Sequence[int],
        delete_raw: Callable[[int, int, int], int],
    ) -> None:
        self._db = conn
        self.levels = sorted(levels)
        self._delete_raw = delete_raw
        self._lo: dict[int, list[int]] = {}
        self._before: dict[int, int] = {}  # raw points expired before (cached with _lo)
        self.due: dict[int, None] = {}  # an ordered set of series ids
        self._retention: collections.deque[tuple[int, str, str]] = collections.deque()
        self._policy: RetentionPolicy | None = None
        self.points_read = 0  # raw points read by the current step

    def start(self) -> None:
        """Drop levels no longer configured; make every series due once (in a transaction)."""
        marks = ",".join("?" * len(self.levels)) or "NULL"
        self._db.execute(f"DELETE FROM ts_rollup WHERE level NOT IN ({marks})", self.levels)
        self._db.execute(f"DELETE FROM ts_rollup_state WHERE level NOT IN ({marks})", self.levels)
        self._db.execute(f"DELETE FROM ts_rollup_level WHERE level NOT IN ({marks})", self.levels)
        if self.levels:
            for (sid,) in self._db.execute("SELECT id FROM ts_series ORDER BY id"):
                self.due[int(sid)] = None

    # -- watermarks ------------------------------------------------------------------

    def _los(self, sid: int) -> list[int]:
        los = self._lo.get(sid)
        if los is None:
            if len(self._lo) >= _MAX_CACHED:
                self._lo.clear()
                self._before.clear()
            los = []
            for size in self.levels:
                row = self._db.execute(schema.ROLLUP_LO, (sid, size)).fetchone()
                los.append(INT64_MIN if row is None else int(row[0]))
            row = self._db.execute(
                "SELECT before FROM ts_expired WHERE series_id = ?", (sid,)
            ).fetchone()
            self._before[sid] = INT64_MIN if row is None else int(row[0])
            self._lo[sid] = los
        return los

    def _expired_before(self, sid: int) -> int:
        self._los(sid)
        return self._before[sid]

    def _set_lo(self, sid: int, i: int, lo: int) -> None:
        self._db.execute(
            "INSERT INTO ts_rollup_state (series_id, level, lo) VALUES (?, ?, ?)"
            " ON CONFLICT (series_id, level) DO UPDATE SET lo = excluded.lo",
            (sid, self.levels[i], lo),
        )
        self._los(sid)[i] = lo

    def moved(self, spans: Iterable[tuple[int, int, int]]) -> None:
        """Points of (series, min ts, max ts) just moved into chunks."""
        if not self.levels:
            return
        for sid, lo_ts, hi_ts in spans:
            los = self._los(sid)
            # A point older than the raw expiry cannot be rolled up with the expired
            # points of its bucket: it is left out (the next retention pass deletes it).
            lo_ts = max(lo_ts, self._before[sid])
            for i, size in enumerate(self.levels):
                lo = los[i]
                if lo != INT64_MIN and lo_ts < lo:
                    lo = rollup.floor(lo_ts, size)
                    self._set_lo(sid, i, lo)
                if lo == INT64_MIN or hi_ts >= lo + _span(size) + size:
                    self.due[sid] = None

    def lowered(self, sid: int, start_ts: int, end_ts: int, *, raw_deleted: bool) -> None:
        """Points of a series in [start_ts, end_ts] were deleted.

        Where the raw points had expired already, the buckets the range covers whole are
        deleted (those it cuts keep their aggregates: there is nothing to recompute
        them from); elsewhere the watermark moves back and the buckets are recomputed.
        """
        if not self.levels:
            return
        los = self._los(sid)
        before = self._before[sid]
        for i, size in enumerate(self.levels):
            if start_ts < before:
                a, b = rollup.ceil(start_ts, size), min(rollup.floor(end_ts + 1, size), before)
                if a < b:
                    self._replace(sid, size, a, b, rollup.empty())
            start = max(start_ts, before)
            if raw_deleted and los[i] != INT64_MIN and start < los[i] and start <= end_ts:
                self._set_lo(sid, i, rollup.floor(start, size))
        if raw_deleted:
            self.due[sid] = None

    def forget(self, sids: Sequence[int]) -> None:
        """The series were deleted: drop their rollups."""
        params = [(s,) for s in sids]
        self._db.executemany("DELETE FROM ts_rollup WHERE series_id = ?", params)
        self._db.executemany("DELETE FROM ts_rollup_state WHERE series_id = ?", params)
        self._db.executemany("DELETE FROM ts_expired WHERE series_id = ?", params)
        for sid in sids:
            self._lo.pop(sid, None)
            self._before.pop(sid, None)
            self.due.pop(sid, None)

    # -- rolling up ------------------------------------------------------------------

    def roll_next(self, *, force: bool, deadline: float | None = None) -> None:
        """One step for the first due series, up to `_SERIES_PER_STEP` of them while
        the step has read fewer raw points than one series may (one transaction, which
        the caller opened: a commit, with its fsync, per series would cost more than
        the rolling up of a quiet series).

        Args:
            force: roll up the open bucket too (`compact_all`).
            deadline: `time.perf_counter()` after which no further series is taken.
        """
        cap = _POINTS_PER_FORCED_STEP if force else _POINTS_PER_STEP
        self.points_read = 0
        for n in range(_SERIES_PER_STEP):
            if not self.due or self.points_read >= cap:
                return
            if n and deadline is not None and time.perf_counter() > deadline:
                return
            sid = next(iter(self.due))
            del self.due[sid]
            if self.roll(sid, force=force):
                self.due[sid] = None  # more to do: behind the other due series

    def roll(self, sid: int, *, force: bool, until: int | None = None) -> bool:
        """Roll up one series' buckets, at most `_POINTS_PER_STEP` raw points per level.

        Args:
            until: roll up to this bucket start and no further, open or not.

        Returns:
            whether more remains to roll up.
        """
        db = self._db
        (newest,) = db.execute(
            "SELECT max(max_ts) FROM ts_chunk WHERE series_id = ?", (sid,)
        ).fetchone()
        more = False
        for i, size in enumerate(self.levels):
            lo = self._los(sid)[i]
            if newest is None:
                if lo != INT64_MIN:
                    self._replace(sid, size, lo, None, rollup.empty())
                continue
            if until is not None:
                hi = until
            else:
                hi = rollup.floor(int(newest), size)
                if force:
                    hi += size
                elif lo != INT64_MIN and hi - lo < _span(size):
                    continue
            if lo == INT64_MIN:
                db.execute("DELETE FROM ts_rollup WHERE series_id = ? AND level = ?", (sid, size))
                (first,) = db.execute(
                    "SELECT min(min_ts) FROM ts_chunk WHERE series_id = ?", (sid,)
                ).fetchone()
                lo = max(rollup.floor(int(first), size), self._expired_before(sid))
                if hi <= lo:  # nothing closed yet; nothing before the first point
                    self._set_lo(sid, i, lo)
                    continue
            if hi <= lo:
                continue
            cap = _POINTS_PER_FORCED_STEP if force and until is None else _POINTS_PER_STEP
            end = self._roll_range(sid, size, lo, hi, cap)
            self._set_lo(sid, i, end)
            more = more or end < hi
        return more

    def _roll_range(self, sid: int, size: int, lo: int, hi: int, cap: int) -> int:
        """Recompute buckets [lo, end) from chunks; return `end` (<= hi, > lo)."""
        db = self._db
        metas = db.execute(
            "SELECT id, min_ts, n FROM ts_chunk WHERE series_id = ? AND max_ts >= ?"
            " AND min_ts < ? ORDER BY min_ts",
            (sid, lo, hi),
        ).fetchall()
        total = 0
        for _, min_ts, n in metas:
            total += n
            if total > cap:
                hi = min(hi, max(lo + size, rollup.floor(int(min_ts), size)))
                break
        ids = [cid for cid, min_ts, _ in metas if min_ts < hi]
        self.points_read += sum(n for _, min_ts, n in metas if min_ts < hi)
        parts = [
            chunking.decode(kind, ts, vals) for _, kind, ts, vals in schema.fetch_chunks(db, ids)
        ]
        points = merge(parts).window(lo, hi - 1)
        self._replace(sid, size, lo, hi, rollup.compute(points, size))
        return hi

    def _replace(
        self, sid: int, size: int, lo: int, hi: int | None, new: rollup.RollupArray
    ) -> None:
        """Make `new` the level's buckets in [lo, hi) (hi None: to the end)."""
        db = self._db
        b_lo = (lo // size) // _B
        b_hi = 2**62 if hi is None else ((hi - 1) // size) // _B
        old = [
            np.frombuffer(blob, rollup.ROLLUP)
            for (blob,) in db.execute(schema.ROLLUP_BLOCKS, (sid, size, b_lo, b_hi))
        ]
        kept = []
        for part in old:
            outside = part["ts"] < lo
            if hi is not None:
                outside |= part["ts"] >= hi
            kept.append(part[outside])
        merged = rollup.concat_sorted([*kept, new])
        db.execute(
            "DELETE FROM ts_rollup WHERE series_id = ? AND level = ? AND block BETWEEN ? AND ?",
            (sid, size, b_lo, b_hi),
        )
        if not len(merged):
            return
        blocks = (merged["ts"] // size) // _B
        cuts = np.flatnonzero(blocks[1:] != blocks[:-1]) + 1
        db.executemany(
            "INSERT INTO ts_rollup (series_id, level, block, buckets) VALUES (?, ?, ?, ?)",
            [
                (sid, size, int(part["ts"][0] // size) // _B, part.tobytes())
                for part in np.split(merged, cuts)
            ],
        )

    # -- retention -------------------------------------------------------------------

    def start_retention(self, policy: RetentionPolicy) -> None:
        """Plan a retention pass over every series (run by `retention_step`)."""
        self._policy = policy
        self._retention = collections.deque(
            (int(sid), entity, key)
            for sid, entity, key in self._db.execute(
                "SELECT s.id, s.entity_id, k.key FROM ts_series s JOIN ts_key k"
                " ON k.id = s.key_id ORDER BY s.id"
            )
        )
        for size, ttl in policy.levels.items():
            if ttl > 0 and size in self.levels:
                # Whole blocks only: a block goes when its last bucket has expired.
                span = _B * size
                before = (policy.now_ms - ttl) // span * span
                self._db.execute(
                    "DELETE FROM ts_rollup WHERE level = ? AND block < ?", (size, before // span)
                )
                self._db.execute(
                    "INSERT INTO ts_rollup_level (level, expired_before) VALUES (?, ?)"
                    " ON CONFLICT (level) DO UPDATE"
                    " SET expired_before = max(expired_before, excluded.expired_before)",
                    (size, before),
                )

    @property
    def retention_pending(self) -> bool:
        return bool(self._retention)

    def retention_step(self) -> int:
        """One step of the pass: roll up a bounded part of the next series' expiring
        range, or, once it is all rolled up, delete it; return the points deleted."""
        sid, entity, key = self._retention[0]
        assert self._policy is not None
        align = self.levels[-1] if self.levels else 1
        cutoff = self._policy.raw_cutoff(entity, key, align)
        if cutoff is not None:
            (oldest,) = self._db.execute(
                "SELECT min(min_ts) FROM ts_chunk WHERE series_id = ?", (sid,)
            ).fetchone()
            if oldest is None or oldest >= cutoff:
                cutoff = None
        if cutoff is None:
            self._retention.popleft()
            return 0
        # Everything before the cutoff must be in the rollups before it goes.
        if self.levels and self.roll(sid, force=True, until=cutoff):
            return 0  # more to roll up: the next step goes on
        self._retention.popleft()
        if cutoff > self._expired_before(sid):
            self._db.execute(
                "INSERT INTO ts_expired (series_id, before) VALUES (?, ?)"
                " ON CONFLICT (series_id) DO UPDATE SET before = excluded.before",
                (sid, cutoff),
            )
            self._before[sid] = cutoff
        return self._delete_raw(sid, INT64_MIN, cutoff - 1)

    def rolled_back(self) -> None:
        """A transaction was rolled back: forget cached watermarks it may have moved."""
        self._lo.clear()
        self._before.clear()
