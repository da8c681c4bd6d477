"""The schema of the time-series database and the SQL the store runs on it.

Schema changes are numbered migrations applied at open (`PRAGMA user_version` holds the
number applied), like `state.db`. Why the tables look like this is explained in the
module docstring of `tsdb.py`.
"""

from __future__ import annotations

import sqlite3
from typing import Any

import msgspec

from iotmesh.storage.points import Kind
from iotmesh.storage.sqlite import migrations

# Migration N turns schema N-1 into schema N. Append only; never edit a released one.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE ts_key (
        id   INTEGER PRIMARY KEY,
        key  TEXT NOT NULL UNIQUE
    );
    CREATE TABLE ts_series (
        id         INTEGER PRIMARY KEY,
        entity_id  TEXT NOT NULL,
        key_id     INTEGER NOT NULL REFERENCES ts_key (id),
        UNIQUE (entity_id, key_id)
    );
    -- A write transaction's points, sorted by (series, ts), as columns, in parts that
    -- each hold the series min_sid..max_sid. id is write order.
    CREATE TABLE ts_batch (
        id       INTEGER PRIMARY KEY,
        batch    INTEGER NOT NULL,
        min_sid  INTEGER NOT NULL,
        max_sid  INTEGER NOT NULL,
        min_ts   INTEGER NOT NULL,
        max_ts   INTEGER NOT NULL,
        n        INTEGER NOT NULL,
        sids     BLOB NOT NULL,
        starts   BLOB NOT NULL,
        ts       BLOB NOT NULL,
        kinds    BLOB NOT NULL,
        doubles  BLOB NOT NULL,
        longs    BLOB,
        objects  BLOB
    );
    CREATE INDEX ts_batch_series ON ts_batch (max_sid, min_sid);
    -- Points of one series and one kind. id is write order: a new row gets max(id) + 1
    -- and compaction only reuses the ids of the rows it merges.
    CREATE TABLE ts_chunk (
        id         INTEGER PRIMARY KEY,
        series_id  INTEGER NOT NULL,
        min_ts     INTEGER NOT NULL,
        max_ts     INTEGER NOT NULL,
        n          INTEGER NOT NULL,
        kind       INTEGER NOT NULL,
        ts         BLOB NOT NULL,
        vals       BLOB NOT NULL
    );
    CREATE INDEX ts_chunk_range ON ts_chunk (series_id, max_ts, min_ts, n);
    -- value has no declared type, so SQLite keeps what it is given (REAL stays REAL).
    CREATE TABLE ts_latest (
        series_id  INTEGER PRIMARY KEY,
        ts         INTEGER NOT NULL,
        kind       INTEGER NOT NULL,
        value
    );
    """,
    """
    -- Rollup buckets of one series and level (its width in ms): `buckets` holds the
    -- `storage.rollup.ROLLUP` records of buckets block * 256 .. block * 256 + 255.
    CREATE TABLE ts_rollup (
        id         INTEGER PRIMARY KEY,
        series_id  INTEGER NOT NULL,
        level      INTEGER NOT NULL,
        block      INTEGER NOT NULL,
        buckets    BLOB NOT NULL,
        UNIQUE (series_id, level, block)
    );
    -- Every bucket of the level that starts before `lo` is rolled up from the series'
    -- chunks; buckets from `lo` on are not (yet). No row: nothing is rolled up.
    CREATE TABLE ts_rollup_state (
        series_id  INTEGER NOT NULL,
        level      INTEGER NOT NULL,
        lo         INTEGER NOT NULL,
        PRIMARY KEY (series_id, level)
    ) WITHOUT ROWID;
    -- Buckets of the level before `expired_before` were deleted by its TTL: a reader
    -- must not take their absence for "no data" (raw points may outlive them).
    CREATE TABLE ts_rollup_level (
        level           INTEGER PRIMARY KEY,
        expired_before  INTEGER NOT NULL
    );
    -- Raw points of the series before `before` were expired by retention: rollups
    -- there can no longer be recomputed, so nothing moves a watermark below it.
    CREATE TABLE ts_expired (
        series_id  INTEGER PRIMARY KEY,
        before     INTEGER NOT NULL
    );
    """,
)

# Buckets per `ts_rollup` row.
ROLLUP_BLOCK = 256

INSERT_BATCH = """
    INSERT INTO ts_batch (
        batch, min_sid, max_sid, min_ts, max_ts, n, sids, starts, ts, kinds, doubles, longs,
        objects
    )
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""
BATCH_COLUMNS = "sids, starts, ts, kinds, doubles, longs, objects"
# The batch rows that may hold series ?1's points in the range ?2..?3, in id order:
# those whose `sids` column holds ?5 (the id as 8 little-endian bytes) somewhere, a
# superset of the rows that hold it (`batches.holding` keeps those whose match is a
# whole id). A row never spans two series groups, so ?4, the last id of ?1's group,
# bounds the index range: without it the scan of `max_sid >= ?1` reads every later
# group's rows.
SERIES_BATCHES = f"""
    SELECT {BATCH_COLUMNS} FROM ts_batch
    WHERE max_sid BETWEEN ?1 AND ?4 AND min_sid <= ?1 AND max_ts >= ?2 AND min_ts <= ?3
        AND instr(sids, ?5) > 0
    ORDER BY id
"""
INSERT_CHUNK = """
    INSERT INTO ts_chunk (id, series_id, min_ts, max_ts, n, kind, ts, vals)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?)
"""
CHUNK_META = """
    SELECT id, min_ts, max_ts, n FROM ts_chunk
    WHERE series_id = ? AND max_ts >= ? AND min_ts <= ?
"""
UPSERT_LATEST = """
    INSERT INTO ts_latest (series_id, ts, kind, value) VALUES (?, ?, ?, ?)
    ON CONFLICT (series_id) DO UPDATE
    SET ts = excluded.ts, kind = excluded.kind, value = excluded.value
    WHERE excluded.ts >= ts_latest.ts
"""
# The same upsert for a whole write in ONE statement: the rows arrive as one JSON array
# of [series_id, ts, kind, value]. executemany would release and re-take the GIL once
# per row, and each re-take waits for the event-loop thread (up to the switch
# interval) while it is busy: a commit of 1000 rows then took ~30 ms instead of ~4.
UPSERT_LATEST_JSON = """
    INSERT INTO ts_latest (series_id, ts, kind, value)
    SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3 FROM json_each(?) WHERE true
    ON CONFLICT (series_id) DO UPDATE
    SET ts = excluded.ts, kind = excluded.kind, value = excluded.value
    WHERE excluded.ts >= ts_latest.ts
"""
ROLLUP_LO = "SELECT lo FROM ts_rollup_state WHERE series_id = ? AND level = ?"
# The range of a level's buckets a reader may use: [expired_before, lo).
ROLLUP_RANGE = """
    SELECT coalesce(
        (SELECT expired_before FROM ts_rollup_level WHERE level = ?2), -9223372036854775808
    ), lo
    FROM ts_rollup_state WHERE series_id = ?1 AND level = ?2
"""
ROLLUP_BLOCKS = """
    SELECT buckets FROM ts_rollup
    WHERE series_id = ? AND level = ? AND block BETWEEN ? AND ? ORDER BY block
"""
SERIES_ID = """
    SELECT s.id FROM ts_series s JOIN ts_key k ON k.id = s.key_id
    WHERE s.entity_id = ? AND k.key = ?
"""
LATEST = """
    SELECT k.key, l.ts, l.kind, l.value
    FROM ts_series s JOIN ts_key k ON k.id = s.key_id JOIN ts_latest l ON l.series_id = s.id
    WHERE s.entity_id = ?
"""

_JSON = msgspec.json.Encoder()


def migrate(conn: sqlite3.Connection) -> None:
    """Apply every migration newer than the database's `user_version`."""
    migrations.apply(conn, MIGRATIONS, "timeseries db")


def latest_param(kind: int, value: Any) -> Any:
    """A value as `ts_latest.value` stores it: bool as 0/1, JSON as JSON text."""
    if kind == Kind.JSON:
        return _JSON.encode(value).decode()
    if kind == Kind.BOOL:
        return int(value)
    return value


def latest_value(kind: int, value: Any) -> Any:
    """The value of a `ts_latest` row, in its stored type."""
    if kind == Kind.DOUBLE:
        return float(value)
    if kind == Kind.BOOL:
        return bool(value)
    if kind == Kind.JSON:
        return msgspec.json.decode(value)
    return value


def fetch_chunks(db: sqlite3.Connection, ids: list[int]) -> list[tuple[int, int, bytes, bytes]]:
    """(id, kind, ts, vals) of chunks `ids`, in id order."""
    rows: list[tuple[int, int, bytes, bytes]] = []
    for lo in range(0, len(ids), 500):  # far below SQLite's limit of variables
        part = ids[lo : lo + 500]
        marks = ",".join("?" * len(part))
        rows.extend(
            db.execute(f"SELECT id, kind, ts, vals FROM ts_chunk WHERE id IN ({marks})", part)
        )
    rows.sort()
    return rows
