"""Server-side RPC requests in the SQLite state store (`rpc_requests`, migration 5).

Functions over the state store's connection, run on its thread by `SqliteStateStore`.
Request ids come from `rpc_ids`, a counter per device that only grows, so an id is
never given twice to one device, even after its request was deleted or purged: a
device that remembers the last id it handled is never confused.

The housekeeping job's writes (`expire`, `purge`) may carry a fencing token: checked
with `cluster.fencing.fenced_sqlite` in their own transaction, against the `fences`
table (migration 6), so a deposed leader's write rolls back.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

import msgspec

from iotmesh.cluster.fencing import FENCES_TABLE, fenced_sqlite
from iotmesh.core.errors import NotFound
from iotmesh.core.types import RpcRecord, RpcStatus
from iotmesh.storage.rpc_rows import (
    DEADLINE,
    DUE_INDEX,
    DUE_ORDER,
    ENDED,
    OPEN,
    RPC_FENCE,
    insert_row,
    update_row,
)

MIGRATION = """
    CREATE TABLE rpc_ids (
        device_id  TEXT PRIMARY KEY REFERENCES devices (id) ON DELETE CASCADE,
        last_id    INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE rpc_requests (
        device_id      TEXT NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
        id             INTEGER NOT NULL,
        method         TEXT NOT NULL,
        params         BLOB NOT NULL,
        oneway         INTEGER NOT NULL,
        persistent     INTEGER NOT NULL,
        status         TEXT NOT NULL,
        timeout_ms     INTEGER NOT NULL,
        created_ts     INTEGER NOT NULL,
        expiration_ts  INTEGER NOT NULL,
        sent_ts        INTEGER,
        delivered_ts   INTEGER,
        finished_ts    INTEGER,
        response       BLOB,
        error          TEXT,
        PRIMARY KEY (device_id, id)
    ) WITHOUT ROWID;
    CREATE INDEX rpc_requests_open ON rpc_requests (device_id, id)
        WHERE status IN ('QUEUED', 'SENT', 'DELIVERED');
    CREATE INDEX rpc_requests_finished ON rpc_requests (finished_ts)
        WHERE finished_ts IS NOT NULL;
"""

# 6: the housekeeping job's index of open requests by deadline, and its fences.
HOUSEKEEPING_MIGRATION = f"{DUE_INDEX}; {FENCES_TABLE}"

_COLUMNS = (
    "device_id, id, method, params, oneway, persistent, status, timeout_ms, created_ts,"
    " expiration_ts, sent_ts, delivered_ts, finished_ts, response, error"
)
_OPEN = OPEN

_json = msgspec.json.Encoder()


def _encode(value: Any) -> bytes:
    return _json.encode(value)


def _record(row: tuple[Any, ...]) -> RpcRecord:
    return RpcRecord(
        device_id=row[0],
        id=row[1],
        method=row[2],
        params=msgspec.json.decode(row[3]),
        oneway=bool(row[4]),
        persistent=bool(row[5]),
        status=RpcStatus(row[6]),
        timeout_ms=row[7],
        created_ts=row[8],
        expiration_ts=row[9],
        sent_ts=row[10],
        delivered_ts=row[11],
        finished_ts=row[12],
        response=None if row[13] is None else msgspec.json.decode(row[13]),
        error=row[14],
    )


def create(db: sqlite3.Connection, record: RpcRecord) -> RpcRecord:
    """Insert `record` with the device's next id (one transaction)."""
    with db:
        db.execute("BEGIN IMMEDIATE")
        if not db.execute("SELECT 1 FROM devices WHERE id = ?", (record.device_id,)).fetchone():
            raise NotFound(f"device {record.device_id} does not exist")
        (rpc_id,) = db.execute(
            "INSERT INTO rpc_ids VALUES (?, 1) ON CONFLICT (device_id) DO UPDATE"
            " SET last_id = rpc_ids.last_id + 1 RETURNING last_id",
            (record.device_id,),
        ).fetchone()
        stored = msgspec.structs.replace(record, id=rpc_id)
        db.execute(
            f"INSERT INTO rpc_requests ({_COLUMNS}) VALUES ({','.join('?' * 15)})",
            insert_row(stored, _encode),
        )
    return stored


def update(db: sqlite3.Connection, records: Sequence[RpcRecord]) -> None:
    """Write the changing fields of stored requests, all in one transaction."""
    with db:
        db.execute("BEGIN IMMEDIATE")
        db.executemany(
            "UPDATE rpc_requests SET status = ?, sent_ts = ?, delivered_ts = ?,"
            " finished_ts = ?, response = ?, error = ? WHERE device_id = ? AND id = ?",
            [update_row(r, _encode) for r in records],
        )


def get(db: sqlite3.Connection, device_id: str, rpc_id: int) -> RpcRecord | None:
    row = db.execute(
        f"SELECT {_COLUMNS} FROM rpc_requests WHERE device_id = ? AND id = ?",
        (device_id, rpc_id),
    ).fetchone()
    return None if row is None else _record(row)


def page(
    db: sqlite3.Connection,
    device_id: str,
    statuses: Sequence[RpcStatus] | None,
    offset: int,
    limit: int,
) -> tuple[list[RpcRecord], int]:
    where = "WHERE device_id = ?"
    params: tuple[Any, ...] = (device_id,)
    if statuses is not None:
        where += f" AND status IN ({','.join('?' * len(statuses))})"
        params += tuple(s.value for s in statuses)
    rows = db.execute(
        f"SELECT {_COLUMNS} FROM rpc_requests {where} ORDER BY id DESC LIMIT ? OFFSET ?",
        (*params, limit, offset),
    ).fetchall()
    (total,) = db.execute(f"SELECT count(*) FROM rpc_requests {where}", params).fetchone()
    return [_record(r) for r in rows], total


def open_requests(db: sqlite3.Connection) -> list[RpcRecord]:
    rows = db.execute(
        f"SELECT {_COLUMNS} FROM rpc_requests WHERE status IN {_OPEN} ORDER BY device_id, id"
    ).fetchall()
    return [_record(r) for r in rows]


def delete(db: sqlite3.Connection, device_id: str, rpc_id: int) -> bool:
    with db:
        db.execute("BEGIN IMMEDIATE")
        cursor = db.execute(
            "DELETE FROM rpc_requests WHERE device_id = ? AND id = ?", (device_id, rpc_id)
        )
    return cursor.rowcount > 0


def due(
    db: sqlite3.Connection, now: int, after: tuple[int, str, int] | None, limit: int
) -> list[RpcRecord]:
    """Up to `limit` open requests whose deadline is `now` or earlier, by deadline,
    device and id, after `after` (a (deadline, device id, id) cursor)."""
    where = f"status IN {_OPEN} AND {DEADLINE} <= ?"
    params: tuple[Any, ...] = (now,)
    if after is not None:
        where += f" AND ({DUE_ORDER}) > (?, ?, ?)"
        params += after
    rows = db.execute(
        # INDEXED BY: without statistics SQLite may rather scan every open request.
        f"SELECT {_COLUMNS} FROM rpc_requests INDEXED BY rpc_requests_due WHERE {where}"
        f" ORDER BY {DUE_ORDER} LIMIT ?",
        (*params, limit),
    ).fetchall()
    return [_record(r) for r in rows]


def expire(
    db: sqlite3.Connection, keys: Sequence[tuple[str, int]], now: int, token: int | None
) -> list[RpcRecord]:
    """End those of the requests that are still open and due (one transaction, fenced
    by `token` if given); return them as ended."""
    ended: list[RpcRecord] = []
    with db:
        db.execute("BEGIN IMMEDIATE")
        if token is not None:
            fenced_sqlite(db, RPC_FENCE, token)
        for device_id, rpc_id in keys:
            row = db.execute(
                f"UPDATE rpc_requests SET status = {ENDED}, finished_ts = ?"
                f" WHERE device_id = ? AND id = ? AND status IN {_OPEN} AND {DEADLINE} <= ?"
                f" RETURNING {_COLUMNS}",
                (now, device_id, rpc_id, now),
            ).fetchone()
            if row is not None:
                ended.append(_record(row))
    return ended


def purge(db: sqlite3.Connection, finished_before: int, limit: int, token: int | None) -> int:
    with db:
        db.execute("BEGIN IMMEDIATE")
        if token is not None:
            fenced_sqlite(db, RPC_FENCE, token)
        cursor = db.execute(
            "DELETE FROM rpc_requests WHERE (device_id, id) IN (SELECT device_id, id"
            " FROM rpc_requests WHERE finished_ts < ? LIMIT ?)",
            (finished_before, limit),
        )
    return cursor.rowcount
