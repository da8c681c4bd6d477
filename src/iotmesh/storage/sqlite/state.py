"""SQLite state store: devices and credentials in `state.db` of the data dir.

Schema changes are numbered migrations applied at start-up (`PRAGMA user_version` holds
the number applied), so a data dir made by an older release opens and upgrades.
All SQLite work runs on one dedicated thread: state writes are rare and small, and one
connection on one thread needs no locking.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from iotmesh.core.errors import Conflict, NotFound, StorageError
from iotmesh.core.types import Device

T = TypeVar("T")

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
)

_SELECT_DEVICE = """
    SELECT d.id, d.name, d.type, d.label, d.created_ts, c.access_token
    FROM devices d JOIN credentials c ON c.device_id = d.id
"""


def _device(row: tuple[Any, ...]) -> Device:
    return Device(
        id=row[0], name=row[1], type=row[2], label=row[3], created_ts=row[4], access_token=row[5]
    )


def _conflict(exc: sqlite3.IntegrityError) -> Conflict:
    text = str(exc)
    if "devices.name" in text:
        return Conflict("a device with this name already exists")
    if "credentials.access_token" in text:
        return Conflict("this access token is already used by another device")
    return Conflict(text)


def migrate(conn: sqlite3.Connection) -> None:
    """Apply every migration newer than the database's `user_version`."""
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    if version > len(MIGRATIONS):
        raise StorageError(
            f"state.db has schema {version}, newer than this release knows ({len(MIGRATIONS)})"
        )
    for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
        conn.executescript(f"BEGIN; {script}; PRAGMA user_version = {number}; COMMIT;")


class SqliteStateStore:
    """`StateStore` on one SQLite file."""

    def __init__(self, path: Path, synchronous: str = "FULL") -> None:
        self._path = path
        self._synchronous = synchronous
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None

    async def open(self) -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="state-db")
        await self._run(self._open)

    def _open(self) -> None:
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self._synchronous}")
        conn.execute("PRAGMA foreign_keys=ON")
        migrate(conn)
        self._conn = conn

    async def close(self) -> None:
        if self._executor is None:
            return
        if self._conn is not None:
            await self._run(self._conn.close)
            self._conn = None
        self._executor.shutdown(wait=True)
        self._executor = None

    async def _run(self, fn: Callable[[], T]) -> T:
        if self._executor is None:
            raise StorageError("state store is not open")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn)
        except sqlite3.IntegrityError as exc:
            raise _conflict(exc) from exc
        except sqlite3.Error as exc:
            raise StorageError(f"state store: {exc}") from exc

    @property
    def _db(self) -> sqlite3.Connection:
        assert self._conn is not None, "state store is not open"
        return self._conn

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
                    "INSERT INTO devices (id, name, type, label, created_ts) VALUES (?,?,?,?,?)",
                    (device.id, device.name, device.type, device.label, device.created_ts),
                ),
                (
                    "INSERT INTO credentials (device_id, access_token) VALUES (?, ?)",
                    (device.id, device.access_token),
                ),
            )
        )

    async def get_device(self, device_id: str) -> Device | None:
        row = await self._run(
            lambda: self._db.execute(_SELECT_DEVICE + " WHERE d.id = ?", (device_id,)).fetchone()
        )
        return None if row is None else _device(row)

    async def device_by_token(self, access_token: str) -> Device | None:
        row = await self._run(
            lambda: self._db.execute(
                _SELECT_DEVICE + " WHERE c.access_token = ?", (access_token,)
            ).fetchone()
        )
        return None if row is None else _device(row)

    async def list_devices(
        self, offset: int, limit: int, text_search: str | None = None
    ) -> tuple[list[Device], int]:
        where: str = ""
        params: tuple[str, ...] = ()
        if text_search:
            where, params = " WHERE d.name LIKE ? ESCAPE '\\'", (_like(text_search),)

        def page() -> tuple[list[Device], int]:
            rows = self._db.execute(
                _SELECT_DEVICE + where + " ORDER BY d.created_ts, d.id LIMIT ? OFFSET ?",
                (*params, limit, offset),
            ).fetchall()
            (total,) = self._db.execute("SELECT count(*) FROM devices d" + where, params).fetchone()
            return [_device(r) for r in rows], total

        return await self._run(page)

    async def update_device(self, device: Device) -> None:
        (count,) = await self._run(
            lambda: self._transaction(
                (
                    "UPDATE devices SET name = ?, type = ?, label = ? WHERE id = ?",
                    (device.name, device.type, device.label, device.id),
                )
            )
        )
        if count == 0:
            raise NotFound(f"device {device.id} does not exist")

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


def _like(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"
