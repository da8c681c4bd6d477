"""When each device was last heard from, in the SQLite state store (`device_activity`,
part of migration 5): what `ConnectivityService` saves every half minute and at stop,
and loads at start, so a restart does not forget it."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from iotmesh.core.types import DeviceActivity

MIGRATION = """
    CREATE TABLE device_activity (
        device_id           TEXT PRIMARY KEY REFERENCES devices (id) ON DELETE CASCADE,
        transport           TEXT,
        last_activity_ts    INTEGER NOT NULL,
        last_connect_ts     INTEGER NOT NULL,
        last_disconnect_ts  INTEGER NOT NULL
    ) WITHOUT ROWID;
"""


def load(db: sqlite3.Connection) -> list[DeviceActivity]:
    rows = db.execute(
        "SELECT device_id, transport, last_activity_ts, last_connect_ts, last_disconnect_ts"
        " FROM device_activity"
    ).fetchall()
    return [DeviceActivity(*row) for row in rows]


def save(db: sqlite3.Connection, records: Sequence[DeviceActivity]) -> None:
    with db:
        db.execute("BEGIN IMMEDIATE")
        # Only for devices that still exist: one deleted meanwhile must not fail the batch.
        db.executemany(
            "INSERT OR REPLACE INTO device_activity SELECT ?, ?, ?, ?, ?"
            " WHERE EXISTS (SELECT 1 FROM devices WHERE id = ?)",
            [
                (
                    r.device_id,
                    r.transport,
                    r.last_activity_ts,
                    r.last_connect_ts,
                    r.last_disconnect_ts,
                    r.device_id,
                )
                for r in records
            ],
        )
