"""Rollups on InfluxDB 1.x: exact, computed by iotmesh, stored in InfluxDB.

Why not continuous queries (1.x) or tasks (2.x/3.x): both compute a bucket once (a CQ
again only within its `RESAMPLE FOR` window, a task within the `range()` of its run);
a late point, a rewrite of a ts or a delete afterwards leaves the bucket wrong, and the
rollup contract (`storage/rollup.py`: an answer from rollups equals the answer from
raw points) does not allow that. So a bucket is recomputed from raw points whenever raw
points of its range changed, never edited in place. The storage format is in
`rollup_format.py`, the reads in `rollup_reads.py`.

How a change reaches the rollups:

* A write first writes a dirty marker per entity (a range per run of buckets of the
  coarsest level C it touches), then, once InfluxDB has acknowledged the markers, its
  points; a delete writes a marker per key (its exact range), then deletes. A crash
  in between leaves a marker without a change (a needless recompute), never a change
  without a marker. Readers compute dirty ranges from raw points.
* The step (`RollupUpkeep.step`, never in the write path) reads the markers up to a
  time T (their time is the seq of their write: a ns clock), recomputes every level's
  buckets of their ranges from raw points (last write wins, as reads see them), writes
  them, and only then deletes the markers up to T, in one statement. A delete's
  marker first deletes the buckets its range covers whole (no raw point is left
  there, expired or not); its edge buckets are recomputed.
* T is below the seq of any write or delete in flight in this process (its points may
  be half visible), and, unless forced (tests, benchmarks), `LAG_S` in the past, which
  covers requests in flight in other processes. Every write with a seq up to T has
  finished before the markers are read, so every marker up to T is read: the delete
  up to T clears only what was handled.
* In the background, a marker whose range reaches into a bucket of C that is still
  open (by the wall clock) is not handled but written again (a new seq, merged per
  entity): an open hour is computed once, when it closes, not at every step.
* One process per database runs the step (the retention job's, `wiring.py`): two could
  write an older computation of a bucket after a newer one.
* Raw retention: `apply_retention` first runs the step over every bucket, open ones
  too, then deletes raw points before each series' cutoff (aligned down to C), and from
  then on the step never recomputes a bucket before a series' cutoff: those keep the
  aggregates of the expired points (a point arriving already older than its TTL is left
  out of the rollups, as on SQLite). The cutoffs are the latest policy's, in memory:
  until the first retention pass after a start (the job runs one at start) none applies.
* Levels: a level without a `rollup_level` point (new, or configured again after it
  was dropped) is built at `open` from a marker per entity over all its data; a level
  no longer configured is dropped, with its buckets.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from iotmesh.core.clock import now_ms
from iotmesh.core.lifecycle import Service, cancel_task
from iotmesh.core.types import TsPoint
from iotmesh.storage import rollup
from iotmesh.storage.influx.client import InfluxClient
from iotmesh.storage.influx.lineproto import (
    MAX_TS_MS,
    MEASUREMENT,
    MIN_TS_MS,
    bodies,
    decode_tag,
)
from iotmesh.storage.influx.rollup_format import (
    LEVELS,
    MARKERS,
    SELECT_LEVELS,
    Marker,
    bucket_lines,
    horizons,
    marker_lines,
    measurement,
    merge_ranges,
    ns,
    parse_markers,
    tag,
)
from iotmesh.storage.points import INT64_MIN, Points
from iotmesh.storage.rollup import RetentionPolicy

log = logging.getLogger(__name__)

LAG_S = 30.0  # a marker younger than this may belong to a write in flight elsewhere
STEP_SPAN_NS = 60 * 10**9  # markers (by write time) one step reads at most
MAX_BODY_BYTES = 4 * 1024 * 1024
_WINDOW_MS = 86_400_000  # raw points read at a time when a wide range is rebuilt

# Entities whose raw points one recompute of one bucket of the coarsest level reads
# together (a wider window, rebuilding a level, reads one entity at a time): 16 devices
# of 3 keys at 1 Hz for an hour are ~170k points.
MAX_ENTITIES_PER_READ = 16

# Raw points of one entity in [start, end] ms, by key (None: every key).
RawReader = Callable[[str, Sequence[str] | None, int, int], Awaitable[dict[str, list[TsPoint]]]]
# Raw points of entities in [start, end] ms, by entity and key.
EntitiesReader = Callable[[Sequence[str], int, int], Awaitable[dict[str, dict[str, list[TsPoint]]]]]


class RollupUpkeep:
    """Markers, the step, level state and TTLs of one store's rollup levels.

    Args:
        client: the store's client.
        levels: bucket widths (ms), each a multiple of the one before.
        read_raw: the store's raw read of entities (last write wins, half-visible points
            skipped).
        in_flight: seqs of this process's writes and deletes not finished yet.
        lag_s: how old a marker must be before the background step handles it.
    """

    def __init__(
        self,
        client: InfluxClient,
        levels: Sequence[int],
        read_raw: EntitiesReader,
        in_flight: set[int],
        lag_s: float = LAG_S,
    ) -> None:
        self.client = client
        self.lag_s = lag_s
        self.levels = sorted(levels)
        self.coarsest = self.levels[-1]
        self._read_raw = read_raw
        self._in_flight = in_flight
        self._last_seq = 0
        self.policy: RetentionPolicy | None = None
        self.lock = asyncio.Lock()  # one step at a time (retention holds it across)
        self.handled = 0  # markers handled since open

    def next_seq(self, span: int = 1) -> int:
        """The first of `span` seqs: a ns clock, strictly increasing in this process."""
        seq = max(time.time_ns(), self._last_seq + 1)
        self._last_seq = seq + max(span, 1) - 1
        return seq

    async def write_markers(self, ranges: Sequence[tuple[str, str | None, int, int]]) -> int:
        """Write markers of (entity, key, lo, hi) ranges; return their seq.

        The seq is in flight (`in_flight`) from here: the caller discards it when its
        change is done.
        """
        seq = self.next_seq(len(ranges))
        self._in_flight.add(seq)
        lines, _ = marker_lines(ranges, seq)
        try:
            for body in bodies(lines, MAX_BODY_BYTES):
                await self.client.write(body, "ns")
        except BaseException:
            self._in_flight.discard(seq)
            raise
        return seq

    def cutoff(self, entity: str, key: str) -> int:
        """Raw points of the series before this ms have expired (INT64_MIN: none)."""
        if self.policy is None:
            return INT64_MIN
        cut = self.policy.raw_cutoff(entity, key, self.coarsest)
        return INT64_MIN if cut is None else cut

    # -- levels ------------------------------------------------------------------------

    async def open(self) -> None:
        """Drop levels no longer configured; build the new ones (markers over the data)."""
        shown, built = await self.client.query(["SHOW MEASUREMENTS", SELECT_LEVELS])
        names = {str(row[0]) for series in shown for row in series.values}
        have = horizons(built)
        mine = {measurement(size) for size in self.levels}
        drop = [n for n in names if n.startswith("rollup_") and n[7:].isdigit() and n not in mine]
        statements = [f"DROP MEASUREMENT {name}" for name in sorted(drop)]
        statements += [
            f"DROP SERIES FROM {LEVELS} WHERE {tag('level', str(size))}"
            for size in sorted(have.keys() - set(self.levels))
        ]
        if statements:
            await self.client.query(statements)
        new = [size for size in self.levels if size not in have]
        if not new:
            return
        first, last = await self.client.query(
            [
                f"SELECT FIRST(kind) FROM {MEASUREMENT} GROUP BY entity",
                f"SELECT LAST(kind) FROM {MEASUREMENT} GROUP BY entity",
            ]
        )
        ends = {s.tags["entity"]: int(s.values[0][0]) for s in last if s.values}
        c = self.coarsest
        ranges: list[tuple[str, str | None, int, int]] = [
            (decode_tag(e), None, rollup.floor(int(s.values[0][0]), c), ends[e] + 1)
            for s in first
            if s.values and (e := s.tags["entity"]) in ends
        ]
        if ranges:
            self._in_flight.discard(await self.write_markers(ranges))
        state = [f"{LEVELS},level={size} expired_before={MIN_TS_MS}i 0" for size in new]
        await self.client.write(("\n".join(state) + "\n").encode())

    async def expire(self, policy: RetentionPolicy) -> None:
        """Delete each level's buckets older than its TTL; record the horizon first."""
        (result,) = await self.client.query([SELECT_LEVELS])
        known = horizons(result)
        lines, statements = [], []
        for size, ttl in sorted(policy.levels.items()):
            if ttl <= 0 or size not in known:
                continue
            before = rollup.floor(policy.now_ms - ttl, size)
            if before <= known[size]:
                continue
            lines.append(f"{LEVELS},level={size} expired_before={before}i 0")
            statements.append(f"DELETE FROM {measurement(size)} WHERE time < {ns(before)}")
        if lines:
            await self.client.write(("\n".join(lines) + "\n").encode())
            await self.client.query(statements)

    # -- the step ----------------------------------------------------------------------

    async def catch_up(self, *, open_buckets: bool, no_lag: bool) -> int:
        """Steps (`lock` held by the caller) until one finds nothing; return the markers."""
        total = 0
        for _ in range(100_000):  # bounded: each round reads at least one marker
            found = await self.step_locked(open_buckets=open_buckets, no_lag=no_lag)
            if not found:
                break
            total += found
        return total

    async def roll_up_before_expiry(self, policy: RetentionPolicy) -> None:
        """Bring every bucket a raw TTL of `policy` reaches up to date (`lock` held).

        A marker too young to handle (`lag_s`) whose range reaches below the latest
        cutoff is a late point that may still be in flight: wait once for it.
        """
        await self.catch_up(open_buckets=True, no_lag=False)
        ttls = [policy.raw_ttl_ms, *policy.keys.values(), *policy.entities.values()]
        shortest = min((t for t in ttls if t > 0), default=0)
        if not shortest:
            return
        latest_cutoff = policy.now_ms - shortest
        (young,) = await self.client.query([f"SELECT lo FROM {MARKERS} WHERE lo < {latest_cutoff}"])
        if young and self.lag_s > 0:
            await asyncio.sleep(self.lag_s)
            await self.catch_up(open_buckets=True, no_lag=False)

    async def step(self, *, open_buckets: bool = False, no_lag: bool = False) -> int:
        """Handle the markers of up to `STEP_SPAN_NS` of writes; return how many it read.

        Args:
            open_buckets: handle markers reaching into an open bucket of the coarsest
                level too (else they are written again, for later).
            no_lag: handle markers younger than `LAG_S` (tests, benchmarks: when no
                other process writes).
        """
        async with self.lock:
            return await self.step_locked(open_buckets=open_buckets, no_lag=no_lag)

    async def step_locked(self, *, open_buckets: bool, no_lag: bool) -> int:
        """`step`, with `lock` held by the caller."""
        # Before any read (see the module docstring): what is in flight now, and T.
        upto = time.time_ns() - (0 if no_lag else int(self.lag_s * 1e9))
        if self._in_flight:
            upto = min(upto, min(self._in_flight) - 1)
        (oldest,) = await self.client.query([f"SELECT FIRST(lo) FROM {MARKERS}"], epoch="ns")
        if not oldest or not oldest[0].values or int(oldest[0].values[0][0]) > upto:
            return 0
        upto = min(upto, int(oldest[0].values[0][0]) + STEP_SPAN_NS)
        (result,) = await self.client.query(
            [f'SELECT lo, hi FROM {MARKERS} WHERE time <= {upto} GROUP BY entity, "key"'],
            epoch="ns",
        )
        markers = parse_markers(result)
        now = now_ms()
        by_entity: dict[str, list[Marker]] = {}
        later: list[tuple[str, str | None, int, int]] = []
        for m in markers:
            if open_buckets or m.key is not None or rollup.ceil(m.hi, self.coarsest) <= now:
                by_entity.setdefault(m.entity, []).append(m)
            else:
                later.append((m.entity, None, m.lo, m.hi))
        await self._handle(by_entity)
        if later:
            merged = [
                (entity, None, lo, hi)
                for entity in dict.fromkeys(e for e, *_ in later)
                for lo, hi in merge_ranges([(a, b) for e, _, a, b in later if e == entity])
            ]
            self._in_flight.discard(await self.write_markers(merged))
        await self.client.query([f"DELETE FROM {MARKERS} WHERE time <= {upto}"])
        self.handled += len(markers) - len(later)
        return len(markers)

    async def _handle(self, by_entity: dict[str, list[Marker]]) -> None:
        """Delete what delete markers cover whole, then recompute every marked range;
        entities with the same ranges (in-order data: the same hour) read together."""
        c = self.coarsest
        window = max(c, _WINDOW_MS // c * c)
        deletes: list[str] = []
        windows: dict[tuple[int, int], list[str]] = {}
        for entity, markers in by_entity.items():
            ranges: list[tuple[int, int]] = []
            for m in markers:
                if m.key is None:
                    ranges.append((rollup.floor(m.lo, c), rollup.ceil(m.hi, c)))
                    continue
                # A delete: the buckets it covers whole are empty now; edges recompute.
                # An edge bucket goes too (the recompute writes it again if points are
                # left): one the delete emptied would otherwise keep its old aggregate.
                # Not one before the series' cutoff: it holds aggregates of expired points.
                cut = self.cutoff(entity, m.key)
                for size in self.levels:
                    a, b = rollup.ceil(m.lo, size), rollup.floor(m.hi, size)
                    spans = [(a, b)] if a < b else []
                    for edge in (m.lo, m.hi - 1):
                        start = rollup.floor(edge, size)
                        if start >= cut and MIN_TS_MS <= edge <= MAX_TS_MS:
                            spans.append((start, start + size))
                    deletes.extend(
                        f"DELETE FROM {measurement(size)} WHERE {tag('entity', entity)}"
                        f" AND {tag('key', m.key)} AND time >= {ns(x)} AND time < {ns(y)}"
                        for x, y in spans
                    )
                for edge in (m.lo, m.hi - 1):
                    if MIN_TS_MS <= edge <= MAX_TS_MS:
                        ranges.append((rollup.floor(edge, c), rollup.floor(edge, c) + c))
            for lo, hi in merge_ranges(ranges):
                for a in range(lo, hi, window):
                    windows.setdefault((a, min(hi, a + window)), []).append(entity)
        if deletes:
            await self.client.query(deletes)
        for (lo, hi), entities in windows.items():
            per_read = MAX_ENTITIES_PER_READ if hi - lo <= c else 1
            for i in range(0, len(entities), per_read):
                await self._recompute(entities[i : i + per_read], lo, hi)

    async def _recompute(self, entities: Sequence[str], lo: int, hi: int) -> None:
        """Write every level's buckets of [lo, hi) (aligned to every level) from raw."""
        start, end = max(lo, MIN_TS_MS), min(hi - 1, MAX_TS_MS)
        raw = await self._read_raw(entities, start, end)
        lines: list[str] = []
        for entity, by_key in raw.items():
            for key, found in by_key.items():
                points = Points.from_values([p.ts for p in found], [p.value for p in found])
                cut = self.cutoff(entity, key)
                if cut > lo:
                    points = points.window(cut, end)
                for size in self.levels:
                    lines.extend(bucket_lines(entity, key, size, rollup.compute(points, size)))
        for body in bodies(lines, MAX_BODY_BYTES):
            await self.client.write(body)

    async def forget(self, entity: str) -> None:
        """The entity was deleted: drop its buckets and markers."""
        names = [measurement(size) for size in self.levels] + [MARKERS]
        await self.client.query(
            [f"DROP SERIES FROM {name} WHERE {tag('entity', entity)}" for name in names]
        )


class RollupJob(Service):
    """Runs the rollup step of a store in the background (the retention job's process).

    Error handling: a failed step is logged and tried again after `interval_s`; readers
    compute what is not rolled up from raw points, so waiting loses nothing.

    Resource handling: one task, started by `start` and cancelled by `stop`.
    """

    name = "influx-rollups"

    def __init__(self, upkeep: RollupUpkeep, interval_s: float = 10.0) -> None:
        self._upkeep = upkeep
        self._interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="influx-rollups")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_task(task)

    async def _run(self) -> None:
        while True:
            try:
                # A backlog (each step reads at most STEP_SPAN_NS of it): go on at once.
                for _ in range(1000):
                    if not await self._upkeep.step():
                        break
            except Exception:
                log.exception("InfluxDB rollup step failed; trying again in %ss", self._interval_s)
            await asyncio.sleep(self._interval_s)

    def stats(self) -> dict[str, int]:
        return {"markers_handled": self._upkeep.handled}


__all__ = ["LAG_S", "EntitiesReader", "RawReader", "RollupJob", "RollupUpkeep"]
