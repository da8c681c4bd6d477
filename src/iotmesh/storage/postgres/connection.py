"""Connections to PostgreSQL (asyncpg pools), what its errors mean to iotmesh, and the
numbered schema migrations both PostgreSQL stores apply at start-up.

Every connection has `search_path` set to `storage.postgres.schema_name`, so the SQL of
the stores names tables unqualified and two iotmesh installations (or two test runs)
can share a database in different schemas.

Error handling (`storage_error`): an error is translated to the most specific iotmesh
error, `from` the asyncpg one:

    server unreachable, connection lost, too many connections,
    server shutting down, a statement timeout, any other server error  -> StorageError
    data the server refuses (SQLSTATE class 22, or a value asyncpg
    cannot encode)                                                     -> PayloadError

StorageError is what `BatchWriter` retries with back-off, so a PostgreSQL outage is
back-pressure, not loss. asyncpg's pool reconnects a connection lost in an outage when
it is next acquired, so the platform recovers once the server is back, without a
restart. Unique and foreign-key violations are the state store's to name
(`state.py`); here they are StorageError like any other server error.

Migrations (`migrate`): `iotmesh_schema` holds, per component ("timeseries", "state"),
the number of migrations applied. Each migration runs in its own transaction with its
version bump, holding a transaction-level advisory lock on the schema: several
instances starting together apply each migration once, the others wait and then see it
applied. A schema newer than this release knows is refused.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, NoReturn, TypeAlias

import asyncpg
import asyncpg.exceptions._base as asyncpg_base
from asyncpg.pool import PoolConnectionProxy

from iotmesh.core.errors import PayloadError, StorageError
from iotmesh.core.settings import PostgresSettings

# A connection of its own or one of a pool: the stores use either.
Conn: TypeAlias = "asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]"

# A migration is SQL, or a function of the connection (for one that depends on the
# server, like the TimescaleDB check of the time-series schema).
Migration = str | Callable[[Conn], Awaitable[None]]

# Errors that mean the server (or the network to it) is unavailable.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
    # A protocol error on a broken connection; a cached statement outdated by another
    # instance's schema change (asyncpg drops the cache, the retry succeeds).
    asyncpg_base.InternalClientError,
)


def where(settings: PostgresSettings) -> str:
    """The server and database of the URL without credentials, for messages."""
    url = settings.url
    rest = url.split("://", 1)[-1]
    return rest.rsplit("@", 1)[-1].split("?", 1)[0]


def storage_error(exc: BaseException, what: str) -> StorageError | PayloadError:
    """The iotmesh error an asyncpg (or socket) error means; see the module docstring."""
    if isinstance(exc, asyncpg_base.DataError) and not isinstance(exc, asyncpg.PostgresError):
        return PayloadError(f"a value cannot be stored in PostgreSQL: {exc}")
    if isinstance(exc, asyncpg.DataError):  # SQLSTATE class 22: the data, not the server
        return PayloadError(f"a value cannot be stored in PostgreSQL: {exc}")
    refused = asyncpg.InvalidPasswordError | asyncpg.InvalidAuthorizationSpecificationError
    if isinstance(exc, refused):
        return StorageError(f"{what}: PostgreSQL refused the login: {exc}")
    if isinstance(exc, _UNAVAILABLE):
        return StorageError(f"{what}: PostgreSQL unavailable: {exc or type(exc).__name__}")
    return StorageError(f"{what}: {exc}")


def raise_storage_error(exc: BaseException, what: str) -> NoReturn:
    raise storage_error(exc, what) from exc


# Exceptions `translated` turns into iotmesh errors (anything else is a bug: re-raised).
CAUGHT: tuple[type[BaseException], ...] = (asyncpg.PostgresError, *_UNAVAILABLE)


@asynccontextmanager
async def translated(what: str) -> AsyncIterator[None]:
    """Run a block, raising asyncpg and socket errors as iotmesh errors."""
    try:
        yield
    except CAUGHT as exc:
        raise_storage_error(exc, what)


async def create_pool(settings: PostgresSettings, what: str) -> asyncpg.Pool:
    """A pool of connections to the settings' server, search_path on the schema.

    The schema is created (under the migration lock) by `migrate`, not here.

    Raises:
        StorageError: the server is unreachable or refuses the login.
    """
    password = settings.password.get_secret_value() if settings.password else None
    try:
        pool: asyncpg.Pool = await asyncpg.create_pool(
            settings.url,
            password=password,
            min_size=1,
            max_size=settings.pool_size,
            timeout=settings.timeout_s,
            command_timeout=settings.timeout_s,
            server_settings={
                "search_path": settings.schema_name,
                "application_name": f"iotmesh {what}",
            },
        )
    except CAUGHT as exc:
        raise StorageError(
            f"{what}: cannot connect to PostgreSQL at {where(settings)}: {exc}"
        ) from exc
    return pool


def _lock_key(schema: str) -> int:
    """A stable 32-bit advisory lock key of the schema (one for all its components, as
    they share `iotmesh_schema` and the schema itself)."""
    return zlib.crc32(f"iotmesh:{schema}".encode()) - 2**31


SCHEMA_TABLE = """
    CREATE TABLE IF NOT EXISTS iotmesh_schema (
        component  text PRIMARY KEY,
        version    integer NOT NULL
    )
"""


async def schema_version(conn: Conn, component: str) -> int | None:
    """The number of migrations applied to `component`, None when it has no schema yet."""
    table = await conn.fetchval("SELECT to_regclass('iotmesh_schema')")
    if table is None:
        return None
    version: int | None = await conn.fetchval(
        "SELECT version FROM iotmesh_schema WHERE component = $1", component
    )
    return version


async def migrate(conn: Conn, schema: str, component: str, migrations: Sequence[Migration]) -> int:
    """Apply every migration of `component` not applied yet; return how many were.

    Raises:
        StorageError: the schema is newer than this release knows.
    """
    applied = 0
    key = _lock_key(schema)
    while True:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", key)
            await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
            await conn.execute(SCHEMA_TABLE)
            version = await schema_version(conn, component) or 0
            if version > len(migrations):
                raise StorageError(
                    f"PostgreSQL schema {schema!r} has {component} schema {version}, newer"
                    f" than this release knows ({len(migrations)})"
                )
            if version == len(migrations):
                return applied
            step = migrations[version]
            if isinstance(step, str):
                await conn.execute(step)
            else:
                await step(conn)
            await conn.execute(
                "INSERT INTO iotmesh_schema VALUES ($1, $2)"
                " ON CONFLICT (component) DO UPDATE SET version = excluded.version",
                component,
                version + 1,
            )
            applied += 1


async def server_facts(conn: Conn) -> dict[str, Any]:
    """What `iotmesh doctor` reports: server version, TimescaleDB availability."""
    version = await conn.fetchval("SHOW server_version")
    row = await conn.fetchrow(
        "SELECT default_version, installed_version FROM pg_available_extensions"
        " WHERE name = 'timescaledb'"
    )
    return {
        "version": version,
        "timescaledb_available": row is not None,
        "timescaledb_version": None if row is None else row["installed_version"],
    }


# Fencing tokens of leader-elected jobs (cluster/fencing.py): the highest token that wrote
# each resource. Both components (time series, state) make it in the same schema, hence
# IF NOT EXISTS.
FENCES = "CREATE TABLE IF NOT EXISTS fences (resource text PRIMARY KEY, token bigint NOT NULL)"

# `fencing.FENCE_SQL` with asyncpg's placeholders: 1 row when the token is current or
# newer (recorded), 0 when a newer leader wrote already.
FENCE = (
    "INSERT INTO fences (resource, token) VALUES ($1, $2) "
    "ON CONFLICT (resource) DO UPDATE SET token = excluded.token "
    "WHERE excluded.token >= fences.token"
)


async def fenced(conn: Conn, resource: str, token: int) -> None:
    """Check a fencing token inside the caller's transaction (which must roll back).

    Raises:
        StorageError: `token` is older than one recorded (a newer leader wrote).
    """
    if await conn.execute(FENCE, resource, token) == "INSERT 0 0":
        highest = await conn.fetchval("SELECT token FROM fences WHERE resource = $1", resource)
        raise StorageError(
            f"{resource}: fencing token {token} is older than {highest}; a newer leader runs it"
        )


async def fetch_page(
    conn: Conn, select: str, count: str, args: Sequence[Any], limit: int, offset: int
) -> tuple[list[asyncpg.Record], int]:
    """One page of `select` (ordered; its placeholders are `args`) and the total that
    `count` (same placeholders) gives, read in one snapshot so the two agree."""
    n = len(args)
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        rows = await conn.fetch(f"{select} LIMIT ${n + 1} OFFSET ${n + 2}", *args, limit, offset)
        total: int = await conn.fetchval(count, *args)
    return rows, total


__all__ = [
    "CAUGHT",
    "FENCES",
    "Conn",
    "Migration",
    "create_pool",
    "fenced",
    "fetch_page",
    "migrate",
    "raise_storage_error",
    "schema_version",
    "server_facts",
    "storage_error",
    "translated",
    "where",
]
