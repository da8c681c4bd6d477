"""SQLite state store: devices, credentials, attributes, RPC requests and device activity
in `state.db` of the data dir.

Schema changes are numbered migrations applied at start-up (`PRAGMA user_version` holds
the number applied), so a data dir made by an older release opens and upgrades.
All SQLite work runs on one dedicated thread: state writes are rare and small, and one
connection on one thread needs no locking.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec

from iotmesh.core.errors import Conflict, NotFound
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
from iotmesh.storage.sqlite import device_activity, migrations, rpc_requests
from iotmesh.storage.sqlite.db_thread import DbThread

# Migration N turns schema N-1 into schema N. Append only; never edit a released one.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE devices (
        id          TEXT PRIMARY KEY,
        name        TEXT NOT NULL UNIQUE,
        type        TEXT NOT NULL,
        label       TEXT,
        created_ts  INTEGER NOT NULL
    );
    CREATE INDEX devices_created ON devices (created_ts, id);
    CREATE TABLE credentials (
        device_id     TEXT PRIMARY KEY REFERENCES devices (id) ON DELETE CASCADE,
        access_token  TEXT NOT NULL UNIQUE
    );
    """,
    # 2: gateways (a device may be one, and may belong to one) and device attributes.
    """
    ALTER TABLE devices ADD COLUMN gateway INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE devices ADD COLUMN gateway_id TEXT REFERENCES devices (id) ON DELETE SET NULL;
    CREATE INDEX devices_gateway ON devices (gateway_id) WHERE gateway_id IS NOT NULL;
    CREATE TABLE attributes (
        device_id       TEXT NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
        scope           TEXT NOT NULL,
        key             TEXT NOT NULL,
        value           BLOB NOT NULL,
        last_update_ts  INTEGER NOT NULL,
        version         INTEGER NOT NULL,
        PRIMARY KEY (device_id, scope, key)
    ) WITHOUT ROWID;
    """,
    # 3: X.509 client certificates as device credentials (SHA-256 fingerprint, hex).
    """
    ALTER TABLE credentials ADD COLUMN cert_fingerprint TEXT;
    CREATE UNIQUE INDEX credentials_cert ON credentials (cert_fingerprint)
        WHERE cert_fingerprint IS NOT NULL;
    """,
    # 4: MQTT Basic credentials (client id, user name, password hash), at most one set per
    # device; the (client id, user name) pair is unique, a missing part counting as ''.
    """
    CREATE TABLE basic_credentials (
        device_id      TEXT PRIMARY KEY REFERENCES devices (id) ON DELETE CASCADE,
        client_id      TEXT,
        username       TEXT,
        password_hash  TEXT,
        CHECK (client_id IS NOT NULL OR username IS NOT NULL),
        CHECK (password_hash IS NULL OR username IS NOT NULL)
    );
    CREATE UNIQUE INDEX basic_credentials_login
        ON basic_credentials (ifnull(client_id, ''), ifnull(username, ''));
    """,
    # 5: server-side RPC requests and their lifecycle, and the per-device id counter;
    # when each device was last heard from.
    rpc_requests.MIGRATION + device_activity.MIGRATION,
    # 6: open RPC requests by deadline, and fencing tokens (the RPC housekeeping job).
    rpc_requests.HOUSEKEEPING_MIGRATION,
)


def _conflict(exc: sqlite3.Error) -> Conflict | None:
    """A unique key violated, as the `Conflict` (409) it means; None for other errors."""
    if not isinstance(exc, sqlite3.IntegrityError):
        return None
    text = str(exc)
    if "devices.name" in text:
        return Conflict("a device with this name already exists")
    if "credentials.access_token" in text:
        return Conflict("this access token is already used by another device")
    if "credentials.cert_fingerprint" in text:
        return Conflict("this certificate is already used by another device")
    if "basic_credentials_login" in text:
        return Conflict(
            "another device has MQTT Basic credentials with this client id and user name"
        )
    return Conflict(text)


def migrate(conn: sqlite3.Connection) -> None:
    """Apply every migration newer than the database's `user_version`."""
    migrations.apply(conn, MIGRATIONS, "state.db")


class SqliteStateStore:
    """`StateStore` on one SQLite file."""

    def __init__(self, path: Path, synchronous: str = "FULL") -> None:
        self._path = path
        self._synchronous = synchronous
        self._thread = DbThread("state store", translate=_conflict)
        self._run = self._thread.run

    async def open(self) -> None:
        await self._thread.open(self._connect)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        # `iotmesh serve`: several processes share the file; a writer waits for another's
        # transaction instead of failing with "database is locked".
        conn.execute("PRAGMA busy_timeout = 10000")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self._synchronous}")
        conn.execute("PRAGMA foreign_keys=ON")
        migrate(conn)
        return conn

    async def close(self) -> None:
        await self._thread.close()

    @property
    def _db(self) -> sqlite3.Connection:
        return self._thread.conn

    def _transaction(self, *statements: tuple[str, tuple[Any, ...]]) -> list[int]:
        """Run statements in one transaction; return each one's rowcount."""
        counts = []
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            for sql, params in statements:
                counts.append(self._db.execute(sql, params).rowcount)
        return counts

    async def create_device(self, device: Device) -> None:
        await self._run(
            lambda: self._transaction(
                (
                    "INSERT INTO devices (id, name, type, label, created_ts, gateway, gateway_id)"
                    " VALUES (?,?,?,?,?,?,?)",
                    (
                        device.id,
                        device.name,
                        device.type,
                        device.label,
                        device.created_ts,
                        int(device.gateway),
                        device.gateway_id,
                    ),
                ),
                (
                    "INSERT INTO credentials (device_id, access_token) VALUES (?, ?)",
                    (device.id, device.access_token),
                ),
            )
        )

    async def get_device(self, device_id: str) -> Device | None:
        row = await self._run(
            lambda: self._db.execute(SELECT_DEVICE + " WHERE d.id = ?", (device_id,)).fetchone()
        )
        return None if row is None else device_from_row(row)

    async def device_by_name(self, name: str) -> Device | None:
        row = await self._run(
            lambda: self._db.execute(SELECT_DEVICE + " WHERE d.name = ?", (name,)).fetchone()
        )
        return None if row is None else device_from_row(row)

    async def device_by_token(self, access_token: str) -> Device | None:
        row = await self._run(
            lambda: self._db.execute(
                SELECT_DEVICE + " WHERE c.access_token = ?", (access_token,)
            ).fetchone()
        )
        return None if row is None else device_from_row(row)

    async def list_devices(
        self, offset: int, limit: int, text_search: str | None = None
    ) -> tuple[list[Device], int]:
        where: str = ""
        params: tuple[str, ...] = ()
        if text_search:
            where, params = " WHERE d.name LIKE ? ESCAPE '\\'", (_like(text_search),)

        def page() -> tuple[list[Device], int]:
            rows = self._db.execute(
                SELECT_DEVICE + where + " ORDER BY d.created_ts, d.id LIMIT ? OFFSET ?",
                (*params, limit, offset),
            ).fetchall()
            (total,) = self._db.execute("SELECT count(*) FROM devices d" + where, params).fetchone()
            return [device_from_row(r) for r in rows], total

        return await self._run(page)

    async def update_device(self, device: Device) -> None:
        (count,) = await self._run(
            lambda: self._transaction(
                (
                    "UPDATE devices SET name = ?, type = ?, label = ?, gateway = ? WHERE id = ?",
                    (device.name, device.type, device.label, int(device.gateway), device.id),
                )
            )
        )
        if count == 0:
            raise NotFound(f"device {device.id} does not exist")

    async def device_by_certificate(self, fingerprint: str) -> Device | None:
        row = await self._run(
            lambda: self._db.execute(
                SELECT_DEVICE + " WHERE c.cert_fingerprint = ?", (fingerprint,)
            ).fetchone()
        )
        return None if row is None else device_from_row(row)

    async def set_certificate(self, device_id: str, fingerprint: str | None) -> None:
        (count,) = await self._run(
            lambda: self._transaction(
                (
                    "UPDATE credentials SET cert_fingerprint = ? WHERE device_id = ?",
                    (fingerprint, device_id),
                )
            )
        )
        if count == 0:
            raise NotFound(f"device {device_id} does not exist")

    async def get_basic_credentials(self, device_id: str) -> BasicCredentials | None:
        row = await self._run(
            lambda: self._db.execute(
                "SELECT client_id, username, password_hash FROM basic_credentials"
                " WHERE device_id = ?",
                (device_id,),
            ).fetchone()
        )
        return None if row is None else BasicCredentials(*row)

    async def device_by_basic(
        self, client_id: str | None, username: str | None
    ) -> tuple[Device, BasicCredentials] | None:
        # The same expressions as the unique index, so the lookup uses it.
        row = await self._run(
            lambda: self._db.execute(
                SELECT_BASIC + " WHERE ifnull(b.client_id, '') = ? AND ifnull(b.username, '') = ?",
                (client_id or "", username or ""),
            ).fetchone()
        )
        return None if row is None else (device_from_row(row), BasicCredentials(*row[-3:]))

    async def set_basic_credentials(
        self, device_id: str, credentials: BasicCredentials | None
    ) -> None:
        def replace() -> int:
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
                if not self._db.execute(
                    "SELECT 1 FROM devices WHERE id = ?", (device_id,)
                ).fetchone():
                    return 0
                self._db.execute("DELETE FROM basic_credentials WHERE device_id = ?", (device_id,))
                if credentials is not None:
                    self._db.execute(
                        "INSERT INTO basic_credentials VALUES (?, ?, ?, ?)",
                        (
                            device_id,
                            credentials.client_id,
                            credentials.username,
                            credentials.password_hash,
                        ),
                    )
            return 1

        if await self._run(replace) == 0:
            raise NotFound(f"device {device_id} does not exist")

    async def set_access_token(self, device_id: str, access_token: str) -> None:
        (count,) = await self._run(
            lambda: self._transaction(
                (
                    "UPDATE credentials SET access_token = ? WHERE device_id = ?",
                    (access_token, device_id),
                )
            )
        )
        if count == 0:
            raise NotFound(f"device {device_id} does not exist")

    async def delete_device(self, device_id: str) -> bool:
        (count,) = await self._run(
            lambda: self._transaction(("DELETE FROM devices WHERE id = ?", (device_id,)))
        )
        return count > 0

    async def get_attributes(
        self, device_id: str, scope: AttributeScope, keys: Sequence[str] | None = None
    ) -> list[Attribute]:
        sql = "SELECT key, value, last_update_ts, version FROM attributes"
        sql += " WHERE device_id = ? AND scope = ?"
        params: tuple[Any, ...] = (device_id, scope.value)
        if keys is not None:
            sql += f" AND key IN ({','.join('?' * len(keys))})"
            params += tuple(keys)
        rows = await self._run(lambda: self._db.execute(sql + " ORDER BY key", params).fetchall())
        return [Attribute(r[0], _json_decode(r[1]), r[2], r[3]) for r in rows]

    async def save_attributes(
        self, device_id: str, scope: AttributeScope, values: dict[str, Any], ts: int
    ) -> list[Attribute]:
        def save() -> list[Attribute]:
            saved = []
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
                for key, value in values.items():
                    (version,) = self._db.execute(
                        "INSERT INTO attributes VALUES (?, ?, ?, ?, ?, 1)"
                        " ON CONFLICT (device_id, scope, key) DO UPDATE SET"
                        " value = excluded.value, last_update_ts = excluded.last_update_ts,"
                        " version = attributes.version + 1 RETURNING version",
                        (device_id, scope.value, key, _json_encode(value), ts),
                    ).fetchone()
                    saved.append(Attribute(key, value, ts, version))
            return saved

        return await self._run(save)

    async def delete_attributes(
        self, device_id: str, scope: AttributeScope, keys: Sequence[str]
    ) -> int:
        (count,) = await self._run(
            lambda: self._transaction(
                (
                    "DELETE FROM attributes WHERE device_id = ? AND scope = ?"
                    f" AND key IN ({','.join('?' * len(keys))})",
                    (device_id, scope.value, *keys),
                )
            )
        )
        return count

    # -- RPC requests (storage/sqlite/rpc_requests.py) ------------------------------------

    async def create_rpc(self, record: RpcRecord) -> RpcRecord:
        return await self._run(lambda: rpc_requests.create(self._db, record))

    async def update_rpcs(self, records: Sequence[RpcRecord]) -> None:
        await self._run(lambda: rpc_requests.update(self._db, records))

    async def get_rpc(self, device_id: str, rpc_id: int) -> RpcRecord | None:
        return await self._run(lambda: rpc_requests.get(self._db, device_id, rpc_id))

    async def list_rpcs(
        self,
        device_id: str,
        statuses: Sequence[RpcStatus] | None,
        offset: int,
        limit: int,
    ) -> tuple[list[RpcRecord], int]:
        return await self._run(
            lambda: rpc_requests.page(self._db, device_id, statuses, offset, limit)
        )

    async def open_rpcs(self) -> list[RpcRecord]:
        return await self._run(lambda: rpc_requests.open_requests(self._db))

    async def delete_rpc(self, device_id: str, rpc_id: int) -> bool:
        return await self._run(lambda: rpc_requests.delete(self._db, device_id, rpc_id))

    async def due_rpcs(
        self, now: int, after: tuple[int, str, int] | None, limit: int
    ) -> list[RpcRecord]:
        return await self._run(lambda: rpc_requests.due(self._db, now, after, limit))

    async def expire_rpcs(
        self, keys: Sequence[tuple[str, int]], now: int, fencing_token: int | None = None
    ) -> list[RpcRecord]:
        return await self._run(lambda: rpc_requests.expire(self._db, keys, now, fencing_token))

    async def purge_rpcs(
        self, finished_before: int, limit: int, fencing_token: int | None = None
    ) -> int:
        return await self._run(
            lambda: rpc_requests.purge(self._db, finished_before, limit, fencing_token)
        )

    async def load_activity(self) -> list[DeviceActivity]:
        return await self._run(lambda: device_activity.load(self._db))

    async def save_activity(self, records: Sequence[DeviceActivity]) -> None:
        await self._run(lambda: device_activity.save(self._db, records))


def _json_encode(value: Any) -> bytes:
    return msgspec.json.encode(value)


def _json_decode(blob: bytes) -> Any:
    return msgspec.json.decode(blob)


def _like(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"
