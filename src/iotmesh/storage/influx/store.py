"""`InfluxTimeSeriesStore`: the time-series store contract on an InfluxDB server.

The data model and the type mapping are in `lineproto.py` (one measurement, a series per
(entity, key), a typed field per value kind plus `kind`). Reads are InfluxQL over HTTP:

- raw ranges: one `SELECT kind, v_* ... GROUP BY "key" ORDER BY time LIMIT n` for all the
  keys of a query (InfluxDB applies LIMIT per series, the contract's per-key limit);
- aggregations run in InfluxDB (`GROUP BY time(<interval>ms) fill(none)`, whose buckets
  are aligned to the epoch, as the contract wants): `COUNT(kind)` for COUNT; for the
  others, the longs (`kind` LONG, `v_l`) and the doubles (`kind` DOUBLE, `v_d`) are
  aggregated apart and combined here per bucket (`aggregates.py`). A probe first finds
  where each key's data lies in the range, to refuse too many buckets
  (`aggregate.check_buckets`) and to narrow the range InfluxDB groups over. Two cases
  InfluxDB cannot answer exactly are aggregated here from the raw points with
  `storage/aggregate.py`, like the SQLite store: long sums that could overflow int64
  (InfluxDB's integer SUM wraps) and series holding non-finite doubles;
- latest values and keys: `SELECT LAST(kind), v_* ... GROUP BY "key"`;
- deletes: count first, then `DELETE` (1.x) or /api/v2/delete (2.x); a device deleted:
  `DROP SERIES`.

Rollups (1.x, the configured levels; `rollups.py`, `rollup_reads.py`): a write carries
dirty markers in its first request (its points then in ns precision); a delete writes
its markers before it deletes; `agg` queries whose interval a level divides read
rollups where they answer exactly. The step that computes them runs outside the write
path (`RollupJob`, or `roll_up`).

Transactions: a `write` is one HTTP request (or a few, for batches over
`MAX_BODY_BYTES`). InfluxDB does not roll a failed request back, but every point is
written whole and rewriting it is idempotent, so the writer's retry of the same batch
ends in the state a transaction would have left. Acknowledged means durable: InfluxDB
answers a write after its WAL is fsynced (1.x: `wal-fsync-delay = "0s"`, the default).

Visibility: InfluxDB 1.x makes a write visible one (series, field) at a time: all the
points of a batch in one series' `kind` field at once, then its `v_d` field at once, and
so on. A reader can therefore catch a point whose `kind` is visible and its value field
not yet (or the reverse). Such a point is treated as not yet written, which keeps
whole batches (each field of a series shows a batch all or nothing), and the read is run
again a few ms later, so that a `limit` or `latest` answer is not cut short by a write in
flight. Aggregations do not check this: one run during a write may count a point the
next raw read still skips.

Resource handling: `open` connects, checks the server and creates the database if
missing; `close` waits for a write in progress, then releases the connection pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

import httpx
import msgspec

from iotmesh.core.errors import StorageError
from iotmesh.core.settings import InfluxSettings
from iotmesh.core.types import Aggregation, Order, TsPoint
from iotmesh.storage import aggregate
from iotmesh.storage.influx import aggregates, retention, rollup_reads
from iotmesh.storage.influx.client import DatabaseNotFound, InfluxClient, Series, literal
from iotmesh.storage.influx.lineproto import (
    MAX_TS_MS,
    MEASUREMENT,
    MIN_TS_MS,
    NONFINITE,
    bodies,
    decode_tag,
    encode_lines,
    encode_tag,
)
from iotmesh.storage.influx.rollup_format import write_ranges
from iotmesh.storage.influx.rollups import LAG_S, RollupUpkeep
from iotmesh.storage.points import Kind, Points
from iotmesh.storage.rollup import RetentionPolicy
from iotmesh.storage.timeseries import Query, SeriesWrite

log = logging.getLogger(__name__)

# Reads again (5, 10, 20, 40 ms apart) when a point is caught half-visible; see the
# module docstring, "Visibility".
MIDWRITE_RETRIES = 4

# Most bytes per /write request: well under InfluxDB's default max-body-size (25 MB).
MAX_BODY_BYTES = 4 * 1024 * 1024

_SELECT_VALUE = "v_d, v_l, v_b, v_s, v_j"
_json = msgspec.json.Decoder()


class InfluxTimeSeriesStore:
    """A `TimeSeriesStore` on InfluxDB 1.x (tested) or 2.x/3.x (same protocol)."""

    def __init__(
        self,
        settings: InfluxSettings,
        transport: httpx.AsyncBaseTransport | None = None,
        levels: Sequence[int] = (),
        rollup_lag_s: float = LAG_S,
    ) -> None:
        """Args:
        levels: rollup bucket widths (ms), each a multiple of the one before; kept on
            1.x only (2.x/3.x: see docs/storage.md), so ignored there.
        rollup_lag_s: how old a dirty marker must be before the background step
            handles it (`rollups.py`; 0 only when no other process writes).
        """
        self.settings = settings
        self.client = InfluxClient(settings, transport)
        # Held by a write; `close` takes it, so it waits for a write in progress.
        self._writing = asyncio.Lock()
        # Seqs of writes and deletes in progress: the rollup step leaves their markers.
        self._in_flight: set[int] = set()
        self.rollups: RollupUpkeep | None = None
        if levels and settings.version == 1:
            self.rollups = RollupUpkeep(
                self.client, levels, self._read_entities, self._in_flight, rollup_lag_s
            )

    async def open(self) -> None:
        await self.client.open()
        try:
            await self.client.ping()
            await self.client.ensure_database()
            if self.rollups is not None:
                await self.rollups.open()
        except BaseException:
            await self.client.close()
            raise

    async def close(self) -> None:
        async with self._writing:
            await self.client.close()

    async def roll_up(self, *, everything: bool = True) -> int:
        """Run the rollup step until it finds nothing to do; return the markers handled.

        Args:
            everything: also open buckets and markers younger than `rollups.LAG_S`
                (tests, benchmarks; only when no other process writes).
        """
        if self.rollups is None:
            return 0
        async with self.rollups.lock:
            return await self.rollups.catch_up(open_buckets=everything, no_lag=everything)

    async def write(self, batch: Sequence[SeriesWrite]) -> None:
        try:
            async with self._writing:
                lines = encode_lines(batch)  # first: refuses a bad batch before markers
                seq = None
                if self.rollups is not None:
                    stamps = [(s.entity_id, [r.ts for r in s.records]) for s in batch]
                    ranges = write_ranges(stamps, self.rollups.coarsest)
                    # Markers first, acknowledged: a crash leaves markers without points,
                    # never points without their markers (see rollups.py).
                    seq = await self.rollups.write_markers(ranges)
                try:
                    for body in bodies(lines, MAX_BODY_BYTES):
                        await self.client.write(body)
                finally:
                    if seq is not None:
                        self._in_flight.discard(seq)
        except DatabaseNotFound:
            # Dropped while we run: create it again, so the writer's retry can succeed.
            with contextlib.suppress(StorageError):
                await self.client.ensure_database()
            raise

    # -- reads ---------------------------------------------------------------------

    async def query(self, query: Query) -> dict[str, list[TsPoint]]:
        q = query
        aggregate.validate(q.start_ts, q.end_ts, q.agg, q.interval_ms, q.limit)
        start, end = max(q.start_ts, MIN_TS_MS), min(q.end_ts, MAX_TS_MS)
        keys = list(dict.fromkeys(q.keys))
        if start > end or not keys:
            return {}
        if q.agg is Aggregation.NONE:
            raw = await self._raw(q.entity_id, keys, start, end, q.order, q.limit)
            return {k: raw[k] for k in keys if k in raw}
        found = None
        if self.rollups is not None:
            found = await rollup_reads.answer(self.rollups, self._read_all, q, keys, start, end)
        if found is None:
            found = await self._aggregated(q, keys, start, end)
        return {k: found[k] for k in keys if found.get(k)}

    async def _read_all(
        self, entity: str, keys: Sequence[str] | None, start: int, end: int
    ) -> dict[str, list[TsPoint]]:
        """Every point of the keys (None: all) in [start, end], oldest first."""
        return await self._raw(entity, keys, start, end, Order.ASC, None)

    async def _read_entities(
        self, entities: Sequence[str], start: int, end: int
    ) -> dict[str, dict[str, list[TsPoint]]]:
        """Every point of the entities in [start, end], by entity and key, oldest first."""
        where = _where_entities(entities) + f" AND {_time_range(start, end)}"
        statement = (
            f"SELECT kind, {_SELECT_VALUE} FROM {MEASUREMENT} WHERE {where}"
            ' GROUP BY entity, "key" ORDER BY time ASC'
        )
        out: dict[str, dict[str, list[TsPoint]]] = {}
        for tags, points in await self._raw_series(statement):
            key = decode_tag(tags["key"])
            out.setdefault(decode_tag(tags["entity"]), {})[key] = points
        return out

    async def _raw(
        self,
        entity: str,
        keys: Sequence[str] | None,
        start: int,
        end: int,
        order: Order,
        limit: int | None,
    ) -> dict[str, list[TsPoint]]:
        where = _where(entity, keys, start, end)
        tail = f" LIMIT {limit}" if limit is not None else ""
        statement = (
            f"SELECT kind, {_SELECT_VALUE} FROM {MEASUREMENT} WHERE {where}"
            f' GROUP BY "key" ORDER BY time {order.value}{tail}'
        )
        return {decode_tag(tags["key"]): pts for tags, pts in await self._raw_series(statement)}

    async def _raw_series(self, statement: str) -> list[tuple[dict[str, str], list[TsPoint]]]:
        """The points of each series a raw SELECT answers (with its tags), read again
        while a point is caught half visible (see "Visibility")."""
        for attempt in range(MIDWRITE_RETRIES + 1):
            (result,) = await self.client.query([statement])
            out: list[tuple[dict[str, str], list[TsPoint]]] = []
            torn = False
            for series in result:
                read = _reader(series.columns, "kind")
                points = []
                for row in series.values:
                    try:
                        points.append(TsPoint(row[0], read(row)))
                    except _MidWrite:
                        torn = True
                if points:
                    out.append((series.tags, points))
            if not torn or not await _wait_for_writes(attempt):
                return out
        raise AssertionError("unreachable")

    async def _aggregated(
        self, q: Query, keys: list[str], start: int, end: int
    ) -> dict[str, list[TsPoint]]:
        spans, exact_here = await self._probe(q, keys, start, end)
        numeric = q.agg is not Aggregation.COUNT
        group = aggregates.group_by(q.interval_ms, q.order.value, q.limit)
        statements: list[str] = []
        planned = [key for key in spans if key not in exact_here]
        for key in planned:
            w = _where(q.entity_id, [key], *spans[key])
            if numeric:
                statements.extend(aggregates.statements(q.agg, w, group))
            else:
                statements.append(f"SELECT COUNT(kind) FROM {MEASUREMENT} WHERE {w}{group}")
        results = await self.client.query(statements) if statements else []
        out: dict[str, list[TsPoint]] = {}
        if not numeric:
            for key, result in zip(planned, results, strict=True):
                rows = [row for series in result for row in series.values]
                out[key] = [TsPoint(int(t), int(c)) for t, c in _ordered(rows, q.order, q.limit)]
            return out
        for i, key in enumerate(planned):
            by_long = aggregates.longs(q.agg, results[2 * i])
            by_double = aggregates.doubles(results[2 * i + 1])
            counts: dict[int, float] = {}
            if both := aggregates.mixed(q.agg, by_long, by_double):
                lo, hi = spans[key]  # within the query's range, like the buckets' points
                w = _where(
                    q.entity_id, [key], max(lo, min(both)), min(hi, max(both) + q.interval_ms - 1)
                )
                group_all = aggregates.group_by(q.interval_ms, "ASC", None)
                (result,) = await self.client.query([aggregates.count_doubles(w, group_all)])
                counts = aggregates.doubles(result)
            try:
                combined = aggregates.combine(q.agg, by_long, by_double, counts)
            except aggregates.MayOverflow:
                exact_here.add(key)
                continue
            out[key] = [TsPoint(t, v) for t, v in _ordered(combined, q.order, q.limit)]
        for key in exact_here:
            out[key] = await self._aggregate_here(q, key, *spans[key])
        return out

    async def _probe(
        self, q: Query, keys: list[str], start: int, end: int
    ) -> tuple[dict[str, tuple[int, int]], set[str]]:
        """Where each key's data lies in the range, and which keys to aggregate here.

        Returns the (first ts, last ts) of each key with data (cheap: InfluxDB reads
        only the first and last block), and the keys holding non-finite doubles (looked
        for only where `v_s` has points at all).

        Raises:
            PayloadError: a key's data spans more than `aggregate.MAX_BUCKETS` buckets
                (its points of every kind, as the SQLite store counts them).
        """
        numeric = q.agg is not Aggregation.COUNT
        where = _where(q.entity_id, keys, start, end)
        probe = [
            f'SELECT FIRST(kind) FROM {MEASUREMENT} WHERE {where} GROUP BY "key"',
            f'SELECT LAST(kind) FROM {MEASUREMENT} WHERE {where} GROUP BY "key"',
        ]
        if numeric:
            probe.append(f'SELECT COUNT(v_s) FROM {MEASUREMENT} WHERE {where} GROUP BY "key"')
        results = await self.client.query(probe)
        first, last = _by_key_ts(results[0]), _by_key_ts(results[1])
        spans = {key: (lo, last[key]) for key, lo in first.items()}
        for lo, hi in spans.values():
            aggregate.check_buckets(lo, hi, q.interval_ms)
        with_strings = list(_by_key_ts(results[2])) if numeric else []
        if not with_strings:
            return spans, set()
        w = _where(q.entity_id, with_strings, start, end) + f" AND kind = {NONFINITE}"
        (found,) = await self.client.query(
            [f'SELECT COUNT(kind) FROM {MEASUREMENT} WHERE {w} GROUP BY "key"']
        )
        return spans, set(_by_key_ts(found))

    async def _aggregate_here(self, q: Query, key: str, start: int, end: int) -> list[TsPoint]:
        """Aggregate one key from its raw points, exactly as `storage/aggregate.py` does."""
        raw = (await self._raw(q.entity_id, [key], start, end, Order.ASC, None)).get(key, [])
        points = Points.from_values([p.ts for p in raw], [p.value for p in raw])
        buckets = aggregate.aggregate(points, q.agg, q.interval_ms)
        return aggregate.to_ts_points(buckets, q.order, q.limit)

    async def latest(self, entity_id: str, keys: Sequence[str] | None = None) -> dict[str, TsPoint]:
        if keys is not None and not keys:
            return {}
        where = _where(entity_id, keys, MIN_TS_MS, MAX_TS_MS)
        statement = (
            f'SELECT LAST(kind), {_SELECT_VALUE} FROM {MEASUREMENT} WHERE {where} GROUP BY "key"'
        )
        for attempt in range(MIDWRITE_RETRIES + 1):
            (result,) = await self.client.query([statement])
            out: dict[str, TsPoint] = {}
            torn = False
            for series in result:
                read = _reader(series.columns, "last")
                for row in series.values:
                    try:
                        out[decode_tag(series.tags["key"])] = TsPoint(row[0], read(row))
                    except _MidWrite:
                        torn = True
            if not torn or not await _wait_for_writes(attempt):
                return out
        raise AssertionError("unreachable")

    async def keys(self, entity_id: str) -> list[str]:
        where = _where(entity_id, None, MIN_TS_MS, MAX_TS_MS)
        statement = f'SELECT LAST(kind) FROM {MEASUREMENT} WHERE {where} GROUP BY "key"'
        (result,) = await self.client.query([statement])
        return sorted(decode_tag(s.tags["key"]) for s in result if s.values)

    # -- deletes -------------------------------------------------------------------

    async def delete(self, entity_id: str, keys: Sequence[str], start_ts: int, end_ts: int) -> int:
        start, end = max(start_ts, MIN_TS_MS), min(end_ts, MAX_TS_MS)
        if not keys or start > end:
            return 0
        where = _where(entity_id, keys, start, end)
        (counted,) = await self.client.query(
            [f'SELECT COUNT(kind) FROM {MEASUREMENT} WHERE {where} GROUP BY "key"']
        )
        count = sum(int(row[1]) for series in counted for row in series.values)
        if self.rollups is not None:
            # Even with no raw point left: the range's buckets may outlive expired ones.
            await self._delete_marked(entity_id, keys, start, end, where if count else None)
            return count
        if count == 0:
            return 0
        if self.settings.version == 1:
            await self.client.query([f"DELETE FROM {MEASUREMENT} WHERE {where}"])
        else:
            for key in dict.fromkeys(keys):
                predicate = f"{_v2_tag('entity', entity_id)} AND {_v2_tag('key', key)}"
                await self.client.delete_v2(predicate, start, end)
        return count

    async def _delete_marked(
        self, entity: str, keys: Sequence[str], start: int, end: int, where: str | None
    ) -> None:
        """1.x with rollups: a delete marker per key, then the DELETE of `where` (None:
        no raw point to delete; the marker still deletes buckets of expired ranges)."""
        assert self.rollups is not None
        seq = await self.rollups.write_markers(
            [(entity, key, start, end + 1) for key in dict.fromkeys(keys)]
        )
        try:
            if where is not None:
                await self.client.query([f"DELETE FROM {MEASUREMENT} WHERE {where}"])
        finally:
            self._in_flight.discard(seq)

    async def apply_retention(self, policy: RetentionPolicy) -> None:
        """Delete raw points past their TTL (`retention.py`) and rollup buckets past
        their level's; rollups are brought up to date before raw points go."""
        if self.settings.version != 1:
            # /api/v2/delete predicates have no `!=`, which the per-key and per-device
            # exceptions need: InfluxDB 2.x/3.x expire data by the bucket's retention.
            if policy.raw_ttl_ms or policy.keys or policy.entities:
                log.warning(
                    "storage.retention raw TTLs are not applied on InfluxDB %d.x;"
                    " set the bucket's retention period instead",
                    self.settings.version,
                )
            return
        if self.rollups is None:
            for statement in retention.statements(policy):
                await self.client.query([statement])
            return
        upkeep = self.rollups
        async with upkeep.lock:
            await upkeep.roll_up_before_expiry(policy)
            upkeep.policy = policy  # from now on, no bucket before a cutoff is recomputed
            for statement in retention.statements(policy, upkeep.coarsest):
                await self.client.query([statement])
        await upkeep.expire(policy)

    async def delete_entity(self, entity_id: str) -> None:
        if self.settings.version == 1:
            entity = literal(encode_tag(entity_id))
            if self.rollups is not None:
                async with self.rollups.lock:  # not under a step writing its buckets
                    await self.client.query(
                        [f"DROP SERIES FROM {MEASUREMENT} WHERE entity = {entity}"]
                    )
                    await self.rollups.forget(entity_id)
                return
            await self.client.query([f"DROP SERIES FROM {MEASUREMENT} WHERE entity = {entity}"])
        else:
            await self.client.delete_v2(_v2_tag("entity", entity_id), MIN_TS_MS, MAX_TS_MS)


# -- InfluxQL helpers ----------------------------------------------------------------


def _where(entity: str, keys: Sequence[str] | None, start: int, end: int) -> str:
    """The WHERE clause of one entity's keys (all when None) within [start, end] ms."""
    parts = [f"entity = {literal(encode_tag(entity))}"]
    if keys is not None:
        parts.append(
            "("
            + " OR ".join(f'"key" = {literal(encode_tag(k))}' for k in dict.fromkeys(keys))
            + ")"
        )
    parts.append(_time_range(start, end))
    return " AND ".join(parts)


def _where_entities(entities: Sequence[str]) -> str:
    """The WHERE condition of several entities."""
    return "(" + " OR ".join(f"entity = {literal(encode_tag(e))}" for e in entities) + ")"


def _time_range(start: int, end: int) -> str:
    """The WHERE condition of [start, end] ms."""
    return f"time >= {start * 1_000_000} AND time <= {end * 1_000_000}"


def _v2_tag(tag: str, value: str) -> str:
    """A tag comparison in the predicate syntax of /api/v2/delete."""
    escaped = encode_tag(value).replace('"', '\\"')
    return f'{tag}="{escaped}"'


class _MidWrite(Exception):
    """A row caught while InfluxDB makes a write visible (its fields do not agree)."""


async def _wait_for_writes(attempt: int) -> bool:
    """Pause before reading again after catching a write half-visible; False: give up."""
    if attempt >= MIDWRITE_RETRIES:
        log.warning("points still half-visible after %d reads; answering without them", attempt)
        return False
    await asyncio.sleep(0.005 * 2**attempt)
    return True


def _reader(columns: list[str], kind_column: str) -> Callable[[list[Any]], Any]:
    """A function of a row giving its value in its stored type, by its kind.

    Raises `_MidWrite` for a row whose `kind` or value field is not visible yet.
    """
    at = {name: i for i, name in enumerate(columns)}
    kind_i = at[kind_column]
    col = {name: at.get(name) for name in ("v_d", "v_l", "v_b", "v_s", "v_j")}

    def cell(row: list[Any], name: str) -> Any:
        i = col[name]
        value = row[i] if i is not None else None
        if value is None:
            raise _MidWrite
        return value

    def read(row: list[Any]) -> Any:
        kind = row[kind_i]
        if kind == Kind.DOUBLE:
            return float(cell(row, "v_d"))
        if kind == Kind.LONG:
            return int(cell(row, "v_l"))
        if kind == Kind.BOOL:
            return bool(cell(row, "v_b"))
        if kind == Kind.STRING:
            return str(cell(row, "v_s"))
        if kind == Kind.JSON:
            return _json.decode(cell(row, "v_j"))
        if kind == NONFINITE:
            return float(cell(row, "v_s"))
        if kind is None:
            raise _MidWrite
        raise StorageError(f"InfluxDB point at {row[0]} has an unknown kind {kind!r}")

    return read


def _by_key_ts(result: list[Series]) -> dict[str, int]:
    """The ts of the one row of each series of a FIRST/LAST/COUNT probe, by key."""
    return {decode_tag(s.tags["key"]): int(s.values[0][0]) for s in result if s.values}


def _ordered(rows: list[Any], order: Order, limit: int) -> list[Any]:
    rows = sorted(rows, key=lambda r: r[0], reverse=order is Order.DESC)
    return rows[:limit]


__all__ = ["InfluxTimeSeriesStore"]
