"""PostgreSQL state store: devices, credentials, attributes, RPC requests and device
activity, with the semantics of the SQLite store (`storage/sqlite/state.py`); both pass
tests/contract/test_state.py.

Schema: the SQLite tables, in PostgreSQL types (boolean, bigint, json for JSON values,
which keeps their text as written), with `COLLATE "C"` on ids, names and keys so that
sorting and comparison are by code point, as in SQLite. Versioned migrations
(`MIGRATIONS`, component "state" in `iotmesh_schema`) are applied at `open`, under an
advisory lock, so several instances may start together (`connection.migrate`).

Error handling: a unique key violated is `Conflict` naming the field (the messages of
the SQLite store); another integrity error is `Conflict` with PostgreSQL's message, as
SQLite's are; everything else follows `connection.storage_error` (StorageError).

Resource handling: `open` creates the pool and migrates; `close` closes the pool,
waiting for the calls in progress.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import msgspec

from iotmesh.core.errors import Conflict, NotFound, StorageError
from iotmesh.core.settings import PostgresSettings
from iotmesh.core.types import (
    Attribute,
    AttributeScope,
    BasicCredentials,
    Device,
    DeviceActivity,
    RpcRecord,
    RpcStatus,
)
from iotmesh.storage.device_rows import SELECT_BASIC, SELECT_DEVICE, device_from_row
from iotmesh.storage.postgres import rpc_requests
from iotmesh.storage.postgres.connection import (
    CAUGHT,
    Migration,
    create_pool,
    fetch_page,
    migrate,
    raise_storage_error,
)

COMPONENT = "state"
_WHAT = "state store"

# Migration N turns schema N-1 into schema N. Append only; never edit a released one.
MIGRATIONS: tuple[Migration, ...] = (
    # 1: devices and their credentials (token, X.509 fingerprint, MQTT Basic), attributes.
    """
    CREATE TABLE devices (
        id          text COLLATE "C" PRIMARY KEY,
        name        text COLLATE "C" NOT NULL CONSTRAINT devices_name_key UNIQUE,
        type        text NOT NULL,
        label       text,
        created_ts  bigint NOT NULL,
        gateway     boolean NOT NULL DEFAULT false,
        gateway_id  text COLLATE "C" REFERENCES devices (id) ON DELETE SET NULL
    );
    CREATE INDEX devices_created ON devices (created_ts, id);
    CREATE INDEX devices_gateway ON devices (gateway_id) WHERE gateway_id IS NOT NULL;
    CREATE TABLE credentials (
        device_id         text COLLATE "C" PRIMARY KEY REFERENCES devices (id) ON DELETE CASCADE,
        access_token      text NOT NULL CONSTRAINT credentials_access_token_key UNIQUE,
        cert_fingerprint  text
    );
    CREATE UNIQUE INDEX credentials_cert ON credentials (cert_fingerprint)
        WHERE cert_fingerprint IS NOT NULL;
    CREATE TABLE basic_credentials (
        device_id      text COLLATE "C" PRIMARY KEY REFERENCES devices (id) ON DELETE CASCADE,
        client_id      text,
        username       text,
        password_hash  text,
        CHECK (client_id IS NOT NULL OR username IS NOT NULL),
        CHECK (password_hash IS NULL OR username IS NOT NULL)
    );
    CREATE UNIQUE INDEX basic_credentials_login
        ON basic_credentials (coalesce(client_id, ''), coalesce(username, ''));
    CREATE TABLE attributes (
        device_id       text COLLATE "C" NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
        scope           text NOT NULL,
        key             text COLLATE "C" NOT NULL,
        value           json NOT NULL,
        last_update_ts  bigint NOT NULL,
        version         bigint NOT NULL,
        PRIMARY KEY (device_id, scope, key)
    );
    """,
    # 2: server-side RPC requests, their per-device id counter; device activity.
    rpc_requests.MIGRATION,
    # 3: open RPC requests by deadline, and fencing tokens (the RPC housekeeping job).
    rpc_requests.HOUSEKEEPING_MIGRATION,
)

_CONFLICTS = {
    "devices_name_key": "a device with this name already exists",
    "credentials_access_token_key": "this access token is already used by another device",
    "credentials_cert": "this certificate is already used by another device",
    "basic_credentials_login": (
        "another device has MQTT Basic credentials with this client id and user name"
    ),
}


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder()


def _count(status: str) -> int:
    """The row count of a command status ("UPDATE 1", "DELETE 0", "INSERT 0 1")."""
    return int(status.rsplit(" ", 1)[1])


class PostgresStateStore:
    """`StateStore` on PostgreSQL."""

    def __init__(self, settings: PostgresSettings) -> None:
        self.settings = settings
        self._pool: asyncpg.Pool | None = None

    async def open(self) -> None:
        pool = await create_pool(self.settings, _WHAT)
        try:
            async with self._connection(pool) as conn:
                await migrate(conn, self.settings.schema_name, COMPONENT, MIGRATIONS)
        except BaseException:
            await pool.close()
            raise
        self._pool = pool

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    @asynccontextmanager
    async def _connection(self, pool: asyncpg.Pool | None = None) -> AsyncIterator[Any]:
        """A connection of the pool; errors raised as iotmesh errors."""
        pool = pool or self._pool
        if pool is None:
            raise StorageError("state store is not open")
        try:
            async with pool.acquire() as conn:
                yield conn
        except asyncpg.UniqueViolationError as exc:
            name = exc.constraint_name or ""
            raise Conflict(_CONFLICTS.get(name, str(exc))) from exc
        except asyncpg.IntegrityConstraintViolationError as exc:
            raise Conflict(str(exc)) from exc
        except CAUGHT as exc:
            raise_storage_error(exc, _WHAT)

    async def _fetch_device(self, where: str, *args: Any) -> Device | None:
        async with self._connection() as conn:
            row = await conn.fetchrow(f"{SELECT_DEVICE} WHERE {where}", *args)
        return None if row is None else device_from_row(row)

    # -- devices and credentials ----------------------------------------------------------

    async def create_device(self, device: Device) -> None:
        async with self._connection() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO devices (id, name, type, label, created_ts, gateway, gateway_id)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7)",
                device.id,
                device.name,
                device.type,
                device.label,
                device.created_ts,
                device.gateway,
                device.gateway_id,
            )
            await conn.execute(
                "INSERT INTO credentials (device_id, access_token) VALUES ($1, $2)",
                device.id,
                device.access_token,
            )

    async def get_device(self, device_id: str) -> Device | None:
        return await self._fetch_device("d.id = $1", device_id)

    async def device_by_name(self, name: str) -> Device | None:
        return await self._fetch_device("d.name = $1", name)

    async def device_by_token(self, access_token: str) -> Device | None:
        return await self._fetch_device("c.access_token = $1", access_token)

    async def device_by_certificate(self, fingerprint: str) -> Device | None:
        return await self._fetch_device("c.cert_fingerprint = $1", fingerprint)

    async def list_devices(
        self, offset: int, limit: int, text_search: str | None = None
    ) -> tuple[list[Device], int]:
        where, args = "", []
        if text_search:
            # ILIKE: SQLite's LIKE ignores case too.
            where, args = " WHERE d.name ILIKE $1", [_like(text_search)]
        async with self._connection() as conn:
            rows, total = await fetch_page(
                conn,
                f"{SELECT_DEVICE}{where} ORDER BY d.created_ts, d.id",
                f"SELECT count(*) FROM devices d{where}",
                args,
                limit,
                offset,
            )
        return [device_from_row(r) for r in rows], total

    async def update_device(self, device: Device) -> None:
        async with self._connection() as conn:
            status = await conn.execute(
                "UPDATE devices SET name = $1, type = $2, label = $3, gateway = $4 WHERE id = $5",
                device.name,
                device.type,
                device.label,
                device.gateway,
                device.id,
            )
        if _count(status) == 0:
            raise NotFound(f"device {device.id} does not exist")

    async def set_certificate(self, device_id: str, fingerprint: str | None) -> None:
        await self._update_credentials("cert_fingerprint", device_id, fingerprint)

    async def set_access_token(self, device_id: str, access_token: str) -> None:
        await self._update_credentials("access_token", device_id, access_token)

    async def _update_credentials(self, column: str, device_id: str, value: str | None) -> None:
        async with self._connection() as conn:
            status = await conn.execute(
                f"UPDATE credentials SET {column} = $1 WHERE device_id = $2", value, device_id
            )
        if _count(status) == 0:
            raise NotFound(f"device {device_id} does not exist")

    async def get_basic_credentials(self, device_id: str) -> BasicCredentials | None:
        async with self._connection() as conn:
            row = await conn.fetchrow(
                "SELECT client_id, username, password_hash FROM basic_credentials"
                " WHERE device_id = $1",
                device_id,
            )
        return None if row is None else BasicCredentials(*row)

    async def device_by_basic(
        self, client_id: str | None, username: str | None
    ) -> tuple[Device, BasicCredentials] | None:
        # The same expressions as the unique index, so the lookup uses it.
        async with self._connection() as conn:
            row = await conn.fetchrow(
                f"{SELECT_BASIC} WHERE coalesce(b.client_id, '') = $1"
                " AND coalesce(b.username, '') = $2",
                client_id or "",
                username or "",
            )
        return None if row is None else (device_from_row(row), BasicCredentials(*row[-3:]))

    async def set_basic_credentials(
        self, device_id: str, credentials: BasicCredentials | None
    ) -> None:
        async with self._connection() as conn, conn.transaction():
            found = await conn.fetchval(
                "SELECT true FROM devices WHERE id = $1 FOR KEY SHARE", device_id
            )
            if not found:
                raise NotFound(f"device {device_id} does not exist")
            await conn.execute("DELETE FROM basic_credentials WHERE device_id = $1", device_id)
            if credentials is not None:
                await conn.execute(
                    "INSERT INTO basic_credentials VALUES ($1, $2, $3, $4)",
                    device_id,
                    credentials.client_id,
                    credentials.username,
                    credentials.password_hash,
                )

    async def delete_device(self, device_id: str) -> bool:
        async with self._connection() as conn:
            status = await conn.execute("DELETE FROM devices WHERE id = $1", device_id)
        return _count(status) > 0

    # -- attributes -----------------------------------------------------------------------

    async def get_attributes(
        self, device_id: str, scope: AttributeScope, keys: Sequence[str] | None = None
    ) -> list[Attribute]:
        sql = "SELECT key, value, last_update_ts, version FROM attributes"
        sql += " WHERE device_id = $1 AND scope = $2"
        args: list[Any] = [device_id, scope.value]
        if keys is not None:
            sql += " AND key = ANY($3::text[])"
            args.append(list(keys))
        async with self._connection() as conn:
            rows = await conn.fetch(sql + " ORDER BY key", *args)
        return [Attribute(r[0], _decoder.decode(r[1]), r[2], r[3]) for r in rows]

    async def save_attributes(
        self, device_id: str, scope: AttributeScope, values: dict[str, Any], ts: int
    ) -> list[Attribute]:
        if not values:
            return []
        keys = list(values)
        async with self._connection() as conn, conn.transaction():
            rows = await conn.fetch(
                "INSERT INTO attributes AS a"
                " SELECT $1, $2, u.key, u.value, $5, 1"
                " FROM unnest($3::text[], $4::json[]) AS u (key, value) ORDER BY u.key"
                " ON CONFLICT (device_id, scope, key) DO UPDATE SET value = excluded.value,"
                " last_update_ts = excluded.last_update_ts, version = a.version + 1"
                " RETURNING key, version",
                device_id,
                scope.value,
                keys,
                [_encoder.encode(values[k]).decode() for k in keys],
                ts,
            )
        versions = dict(rows)
        return [Attribute(k, values[k], ts, versions[k]) for k in keys]

    async def delete_attributes(
        self, device_id: str, scope: AttributeScope, keys: Sequence[str]
    ) -> int:
        async with self._connection() as conn:
            status = await conn.execute(
                "DELETE FROM attributes WHERE device_id = $1 AND scope = $2"
                " AND key = ANY($3::text[])",
                device_id,
                scope.value,
                list(keys),
            )
        return _count(status)

    # -- RPC requests and device activity (rpc_requests.py) -------------------------------

    async def create_rpc(self, record: RpcRecord) -> RpcRecord:
        async with self._connection() as conn:
            return await rpc_requests.create(conn, record)

    async def update_rpcs(self, records: Sequence[RpcRecord]) -> None:
        async with self._connection() as conn:
            await rpc_requests.update(conn, records)

    async def get_rpc(self, device_id: str, rpc_id: int) -> RpcRecord | None:
        async with self._connection() as conn:
            return await rpc_requests.get(conn, device_id, rpc_id)

    async def list_rpcs(
        self,
        device_id: str,
        statuses: Sequence[RpcStatus] | None,
        offset: int,
        limit: int,
    ) -> tuple[list[RpcRecord], int]:
        async with self._connection() as conn:
            return await rpc_requests.page(conn, device_id, statuses, offset, limit)

    async def open_rpcs(self) -> list[RpcRecord]:
        async with self._connection() as conn:
            return await rpc_requests.open_requests(conn)

    async def delete_rpc(self, device_id: str, rpc_id: int) -> bool:
        async with self._connection() as conn:
            return await rpc_requests.delete(conn, device_id, rpc_id)

    async def due_rpcs(
        self, now: int, after: tuple[int, str, int] | None, limit: int
    ) -> list[RpcRecord]:
        async with self._connection() as conn:
            return await rpc_requests.due(conn, now, after, limit)

    async def expire_rpcs(
        self, keys: Sequence[tuple[str, int]], now: int, fencing_token: int | None = None
    ) -> list[RpcRecord]:
        async with self._connection() as conn:
            return await rpc_requests.expire(conn, keys, now, fencing_token)

    async def purge_rpcs(
        self, finished_before: int, limit: int, fencing_token: int | None = None
    ) -> int:
        async with self._connection() as conn:
            return await rpc_requests.purge(conn, finished_before, limit, fencing_token)

    async def load_activity(self) -> list[DeviceActivity]:
        async with self._connection() as conn:
            return await rpc_requests.load_activity(conn)

    async def save_activity(self, records: Sequence[DeviceActivity]) -> None:
        async with self._connection() as conn:
            await rpc_requests.save_activity(conn, records)


def _like(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


__all__ = ["COMPONENT", "MIGRATIONS", "PostgresStateStore"]
