"""Server-side RPC requests and device activity in the PostgreSQL state store
(migration 2), with the semantics of `storage/sqlite/rpc_requests.py` and
`device_activity.py`: ids from a per-device counter that only grows, so an id is never
given twice to one device, even after its request was deleted or purged.

Functions over a connection, called by `PostgresStateStore` inside its error
translation. The housekeeping job's writes (`expire`, `purge`) may carry a fencing
token, checked against `fences` (migration 3) in their own transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg
import msgspec

from iotmesh.core.errors import NotFound
from iotmesh.core.types import DeviceActivity, RpcRecord, RpcStatus
from iotmesh.storage.postgres.connection import FENCES, Conn, fenced, fetch_page
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
        device_id  text COLLATE "C" PRIMARY KEY REFERENCES devices (id) ON DELETE CASCADE,
        last_id    bigint NOT NULL
    );
    CREATE TABLE rpc_requests (
        device_id      text COLLATE "C" NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
        id             bigint NOT NULL,
        method         text NOT NULL,
        params         json NOT NULL,
        oneway         boolean NOT NULL,
        persistent     boolean NOT NULL,
        status         text NOT NULL,
        timeout_ms     bigint NOT NULL,
        created_ts     bigint NOT NULL,
        expiration_ts  bigint NOT NULL,
        sent_ts        bigint,
        delivered_ts   bigint,
        finished_ts    bigint,
        response       json,
        error          text,
        PRIMARY KEY (device_id, id)
    );
    CREATE INDEX rpc_requests_open ON rpc_requests (device_id, id)
        WHERE status IN ('QUEUED', 'SENT', 'DELIVERED');
    CREATE INDEX rpc_requests_finished ON rpc_requests (finished_ts)
        WHERE finished_ts IS NOT NULL;
    CREATE TABLE device_activity (
        device_id           text COLLATE "C" PRIMARY KEY
                            REFERENCES devices (id) ON DELETE CASCADE,
        transport           text,
        last_activity_ts    bigint NOT NULL,
        last_connect_ts     bigint NOT NULL,
        last_disconnect_ts  bigint NOT NULL
    );
"""

# 3: the housekeeping job's index of open requests by deadline, and its fences.
HOUSEKEEPING_MIGRATION = f"{DUE_INDEX}; {FENCES}"

_COLUMNS = (
    "device_id, id, method, params, oneway, persistent, status, timeout_ms, created_ts,"
    " expiration_ts, sent_ts, delivered_ts, finished_ts, response, error"
)
_OPEN = OPEN

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder()


def _encode(value: Any) -> str:
    return _encoder.encode(value).decode()


def _record(row: asyncpg.Record) -> RpcRecord:
    return RpcRecord(
        device_id=row[0],
        id=row[1],
        method=row[2],
        params=_decoder.decode(row[3]),
        oneway=row[4],
        persistent=row[5],
        status=RpcStatus(row[6]),
        timeout_ms=row[7],
        created_ts=row[8],
        expiration_ts=row[9],
        sent_ts=row[10],
        delivered_ts=row[11],
        finished_ts=row[12],
        response=None if row[13] is None else _decoder.decode(row[13]),
        error=row[14],
    )


async def create(conn: Conn, record: RpcRecord) -> RpcRecord:
    """Insert `record` with the device's next id (one transaction)."""
    async with conn.transaction():
        # FOR KEY SHARE: the device cannot be deleted before this transaction ends.
        found = await conn.fetchval(
            "SELECT true FROM devices WHERE id = $1 FOR KEY SHARE", record.device_id
        )
        if not found:
            raise NotFound(f"device {record.device_id} does not exist")
        rpc_id = await conn.fetchval(
            "INSERT INTO rpc_ids AS r VALUES ($1, 1) ON CONFLICT (device_id) DO UPDATE"
            " SET last_id = r.last_id + 1 RETURNING last_id",
            record.device_id,
        )
        stored = msgspec.structs.replace(record, id=rpc_id)
        await conn.execute(
            f"INSERT INTO rpc_requests ({_COLUMNS})"
            f" VALUES ({','.join(f'${i}' for i in range(1, 16))})",
            *insert_row(stored, _encode),
        )
    return stored


async def update(conn: Conn, records: Sequence[RpcRecord]) -> None:
    """Write the changing fields of stored requests, all in one transaction."""
    if not records:
        return
    async with conn.transaction():
        await conn.executemany(
            "UPDATE rpc_requests SET status = $1, sent_ts = $2, delivered_ts = $3,"
            " finished_ts = $4, response = $5, error = $6 WHERE device_id = $7 AND id = $8",
            [update_row(r, _encode) for r in records],
        )


async def get(conn: Conn, device_id: str, rpc_id: int) -> RpcRecord | None:
    row = await conn.fetchrow(
        f"SELECT {_COLUMNS} FROM rpc_requests WHERE device_id = $1 AND id = $2",
        device_id,
        rpc_id,
    )
    return None if row is None else _record(row)


async def page(
    conn: Conn,
    device_id: str,
    statuses: Sequence[RpcStatus] | None,
    offset: int,
    limit: int,
) -> tuple[list[RpcRecord], int]:
    where = "WHERE device_id = $1"
    args: list[Any] = [device_id]
    if statuses is not None:
        where += " AND status = ANY($2::text[])"
        args.append([s.value for s in statuses])
    rows, total = await fetch_page(
        conn,
        f"SELECT {_COLUMNS} FROM rpc_requests {where} ORDER BY id DESC",
        f"SELECT count(*) FROM rpc_requests {where}",
        args,
        limit,
        offset,
    )
    return [_record(r) for r in rows], total


async def open_requests(conn: Conn) -> list[RpcRecord]:
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM rpc_requests WHERE status IN {_OPEN} ORDER BY device_id, id"
    )
    return [_record(r) for r in rows]


async def delete(conn: Conn, device_id: str, rpc_id: int) -> bool:
    status = await conn.execute(
        "DELETE FROM rpc_requests WHERE device_id = $1 AND id = $2", device_id, rpc_id
    )
    return status != "DELETE 0"


async def due(
    conn: Conn, now: int, after: tuple[int, str, int] | None, limit: int
) -> list[RpcRecord]:
    """Up to `limit` open requests whose deadline is `now` or earlier, by deadline,
    device and id, after `after` (a (deadline, device id, id) cursor)."""
    where = f"status IN {_OPEN} AND {DEADLINE} <= $1"
    args: list[Any] = [now, limit]
    if after is not None:
        where += f" AND ({DUE_ORDER}) > ($3, $4, $5)"
        args += after
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM rpc_requests WHERE {where} ORDER BY {DUE_ORDER} LIMIT $2",
        *args,
    )
    return [_record(r) for r in rows]


async def expire(
    conn: Conn, keys: Sequence[tuple[str, int]], now: int, token: int | None
) -> list[RpcRecord]:
    """End those of the requests that are still open and due (one transaction, fenced
    by `token` if given); return them as ended."""
    if not keys:
        return []
    async with conn.transaction():
        if token is not None:
            await fenced(conn, RPC_FENCE, token)
        rows = await conn.fetch(
            f"UPDATE rpc_requests SET status = {ENDED}, finished_ts = $1"
            " FROM unnest($2::text[], $3::bigint[]) AS k (k_device, k_id)"
            f" WHERE device_id = k_device AND id = k_id AND status IN {_OPEN}"
            f" AND {DEADLINE} <= $1 RETURNING {_COLUMNS}",
            now,
            [k[0] for k in keys],
            [k[1] for k in keys],
        )
    return sorted((_record(r) for r in rows), key=lambda r: (r.device_id, r.id))


async def purge(conn: Conn, finished_before: int, limit: int, token: int | None) -> int:
    async with conn.transaction():
        if token is not None:
            await fenced(conn, RPC_FENCE, token)
        status = await conn.execute(
            "DELETE FROM rpc_requests WHERE (device_id, id) IN (SELECT device_id, id"
            " FROM rpc_requests WHERE finished_ts < $1 LIMIT $2)",
            finished_before,
            limit,
        )
    return int(status.rsplit(" ", 1)[1])


async def load_activity(conn: Conn) -> list[DeviceActivity]:
    rows = await conn.fetch(
        "SELECT device_id, transport, last_activity_ts, last_connect_ts, last_disconnect_ts"
        " FROM device_activity ORDER BY device_id"
    )
    return [DeviceActivity(*row) for row in rows]


async def save_activity(conn: Conn, records: Sequence[DeviceActivity]) -> None:
    """Insert or replace, one transaction; devices that no longer exist are skipped."""
    last = {r.device_id: r for r in records}  # a device twice: the later record wins
    if not last:
        return
    rows = sorted(last.values(), key=lambda r: r.device_id)
    async with conn.transaction():
        await conn.execute(
            "INSERT INTO device_activity AS a"
            " SELECT u.* FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[],"
            " $5::bigint[]) AS u (device_id, transport, act, con, dis)"
            " JOIN devices d ON d.id = u.device_id FOR KEY SHARE OF d"
            " ON CONFLICT (device_id) DO UPDATE SET transport = excluded.transport,"
            " last_activity_ts = excluded.last_activity_ts,"
            " last_connect_ts = excluded.last_connect_ts,"
            " last_disconnect_ts = excluded.last_disconnect_ts",
            [r.device_id for r in rows],
            [r.transport for r in rows],
            [r.last_activity_ts for r in rows],
            [r.last_connect_ts for r in rows],
            [r.last_disconnect_ts for r in rows],
        )
