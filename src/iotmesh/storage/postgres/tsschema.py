"""The schema of the PostgreSQL time-series store, and the partitions of its points table.

    ts_meta    (name, value)                          layout and partition interval, fixed
                                                      when the schema is created
    ts_series  (id, entity_id, key)                   one row per (device, key), kept when
                                                      the device's data is deleted
    ts_points  (series_id, ts, kind, v_d, v_l, v_b, v_s, v_j)
               PRIMARY KEY (series_id, ts)            one row per point; a rewrite of the
                                                      same (series, ts) replaces it
               PARTITION BY RANGE (ts)
    ts_latest  (series_id, ts, kind, v_*)             the newest point of each series

`ts` is Unix milliseconds (bigint), as the contract has it: any int64 is a valid
timestamp, and bucketing is integer arithmetic. The value sits in the column of its kind
(`points.Kind`, stored in `kind`): DOUBLE `v_d` (float8, NaN and infinities included),
LONG `v_l` (bigint), BOOL `v_b`, STRING `v_s` (text), JSON `v_j` (json, which keeps the
text as written: jsonb would reorder keys). PostgreSQL text cannot hold the NUL
character: a string holding one is stored as a JSON string in `v_j` with kind STRING.

Partitions (`Partitions`): without TimescaleDB, `ts_points` is range-partitioned by
`ts`, one partition per `partition_interval_s` aligned to the epoch, created just before
the first write that needs it, with the next one ahead (under an advisory lock, in its
own transaction, so two instances cannot race; attached without blocking queries, see
`Partitions.create`). Timestamps before 1970 and from 2100 on go to two catch-all
partitions made with the schema, which bounds the number of partitions a device can
make the store create, whatever timestamps it sends (about 6,800 with weekly ones).

TimescaleDB: when `timescaledb = "auto"` and the extension can be created when the schema
is made, `ts_points` is a plain table turned into a hypertable (`create_hypertable` on
the integer `ts`, chunks of `partition_interval_s`) and TimescaleDB makes its chunks
itself. Everything else is the same SQL. The layout chosen is recorded in `ts_meta` and
never changes for that schema.
"""

from __future__ import annotations

import logging

import asyncpg
import numpy as np
import numpy.typing as npt

from iotmesh.core.settings import PostgresSettings
from iotmesh.storage.postgres import tschunks, tsrollups
from iotmesh.storage.postgres.connection import FENCES, Conn, Migration

log = logging.getLogger(__name__)

COMPONENT = "timeseries"

# 2100-01-01T00:00:00Z: points from here on go to the `ts_points_after` partition.
HIGH_TS = 4_102_444_800_000

_TABLES = """
    CREATE TABLE ts_meta (
        name   text PRIMARY KEY,
        value  text NOT NULL
    );
    CREATE TABLE ts_series (
        id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        entity_id  text COLLATE "C" NOT NULL,
        key        text COLLATE "C" NOT NULL,
        UNIQUE (entity_id, key)
    );
    CREATE TABLE ts_latest (
        series_id  bigint PRIMARY KEY,
        ts         bigint NOT NULL,
        kind       smallint NOT NULL,
        v_d        double precision,
        v_l        bigint,
        v_b        boolean,
        v_s        text,
        v_j        json
    );
"""

_POINTS = """
    CREATE TABLE ts_points (
        series_id  bigint NOT NULL,
        ts         bigint NOT NULL,
        kind       smallint NOT NULL,
        v_d        double precision,
        v_l        bigint,
        v_b        boolean,
        v_s        text,
        v_j        json,
        PRIMARY KEY (series_id, ts)
    )
"""


def migrations(settings: PostgresSettings) -> list[Migration]:
    """The numbered migrations of the time-series schema (append only)."""
    interval_ms = settings.partition_interval_s * 1000

    async def create(conn: Conn) -> None:
        await conn.execute(_TABLES)
        layout = "partitioned"
        if settings.timescaledb == "auto" and await _timescale(conn):
            await conn.execute(_POINTS)
            await conn.execute(
                "SELECT create_hypertable('ts_points', 'ts', chunk_time_interval => $1::bigint)",
                interval_ms,
            )
            layout = "timescaledb"
        else:
            await conn.execute(_POINTS + " PARTITION BY RANGE (ts)")
            await conn.execute(
                "CREATE TABLE ts_points_before PARTITION OF ts_points"
                " FOR VALUES FROM (MINVALUE) TO (0)"
            )
            await conn.execute(
                "CREATE TABLE ts_points_after PARTITION OF ts_points"
                f" FOR VALUES FROM ({HIGH_TS}) TO (MAXVALUE)"
            )
        await conn.executemany(
            "INSERT INTO ts_meta VALUES ($1, $2)",
            [("layout", layout), ("partition_interval_ms", str(interval_ms))],
        )
        log.info("created the PostgreSQL time-series schema (%s)", layout)

    return [create, tschunks.MIGRATION, FENCES, tsrollups.MIGRATION]


async def _timescale(conn: Conn) -> bool:
    """Create the TimescaleDB extension if the server has it; False when it cannot."""
    available = await conn.fetchval(
        "SELECT true FROM pg_available_extensions WHERE name = 'timescaledb'"
    )
    if not available:
        return False
    try:
        async with conn.transaction():  # a savepoint: a failure leaves the migration intact
            await conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
    except asyncpg.PostgresError as exc:
        # Typically: not in shared_preload_libraries. Plain partitions work everywhere.
        log.warning("TimescaleDB is installed but cannot be used (%s); plain partitions", exc)
        return False
    return True


class Partitions:
    """The partitions of `ts_points` known to exist; creates the missing ones."""

    def __init__(self, layout: str, interval_ms: int) -> None:
        self.layout = layout
        self.interval_ms = interval_ms
        self._known: set[int] = set()

    @classmethod
    async def load(cls, conn: Conn) -> Partitions:
        meta = {r[0]: r[1] for r in await conn.fetch("SELECT name, value FROM ts_meta")}
        parts = cls(meta["layout"], int(meta["partition_interval_ms"]))
        if parts.layout == "partitioned":
            rows = await conn.fetch(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
                " WHERE i.inhparent = 'ts_points'::regclass"
            )
            for (name,) in rows:
                if name.startswith("ts_points_p"):
                    parts._known.add(int(name.removeprefix("ts_points_p")))
        return parts

    def missing(self, stamps: npt.NDArray[np.int64]) -> list[int]:
        """The numbers of the partitions `stamps` need that are not known to exist, and
        of the one after the newest of them (created ahead, so that the first write of
        the next interval does not wait for it)."""
        if self.layout != "partitioned" or len(stamps) == 0:
            return []
        inside = stamps[(stamps >= 0) & (stamps < HIGH_TS)]
        if len(inside) == 0:
            return []
        needed = set(np.unique(inside // self.interval_ms).tolist())
        ahead = max(needed) + 1
        if ahead * self.interval_ms < HIGH_TS:
            needed.add(ahead)
        return sorted(needed - self._known)

    async def create(self, conn: Conn, numbers: list[int]) -> None:
        """Create and attach partitions `numbers` (one transaction, under a lock).

        A new table attached with ATTACH PARTITION, not CREATE TABLE ... PARTITION OF:
        the latter takes an ACCESS EXCLUSIVE lock on `ts_points`, so it would wait for
        every query in progress and block the ones after it; ATTACH takes SHARE UPDATE
        EXCLUSIVE, which reads and writes do not conflict with (and an empty table is
        validated at once).
        """
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('iotmesh:partitions'))")
            attached = {
                r[0]
                for r in await conn.fetch(
                    "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
                    " WHERE i.inhparent = 'ts_points'::regclass"
                )
            }
            for k in numbers:
                name = f"ts_points_p{k}"
                if name in attached:  # made by another instance meanwhile
                    continue
                lo, hi = k * self.interval_ms, min((k + 1) * self.interval_ms, HIGH_TS)
                await conn.execute(
                    f"CREATE TABLE {name} (LIKE ts_points INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
                )
                await conn.execute(
                    f"ALTER TABLE ts_points ATTACH PARTITION {name}"
                    f" FOR VALUES FROM ({lo}) TO ({hi})"
                )
        self._known.update(numbers)


__all__ = ["COMPONENT", "HIGH_TS", "Partitions", "migrations"]
