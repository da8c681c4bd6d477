"""The local PostgreSQL server for tests: a database of our own per test session.

Tests use the server at `IOTMESH_TEST_PG_URL` (default: user postgres on 127.0.0.1:5432,
trust auth, as on the development machine; `scripts/test` installs and starts one where
it is missing). A session creates a uniquely named database there and drops it at the
end; each test works in a schema of its own (`PgServer.settings`), so parallel runs and
tests never see each other's tables.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import uuid

import asyncpg

from iotmesh.core.settings import PostgresSettings

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def with_database(url: str, database: str) -> str:
    """`url` naming `database` instead of its own."""
    base, _, query = url.partition("?")
    server = base.rsplit("/", 1)[0] if base.count("/") > 2 else base
    return f"{server}/{database}" + (f"?{query}" if query else "")


class PgServer:
    """A database of this test session on the local PostgreSQL server."""

    def __init__(self, admin_url: str, database: str) -> None:
        self.admin_url = admin_url
        self.database = database
        self.url = with_database(admin_url, database)

    @classmethod
    def create(cls) -> PgServer:
        """Create the session's database.

        Raises:
            RuntimeError: the server is not reachable (with what to do about it).
        """
        admin = os.environ.get("IOTMESH_TEST_PG_URL", DEFAULT_URL)
        server = cls(admin, f"iotmesh_test_{uuid.uuid4().hex[:12]}")
        try:
            server.admin(f'CREATE DATABASE "{server.database}"')
        except (OSError, asyncpg.PostgresError) as exc:
            raise RuntimeError(
                f"PostgreSQL is not reachable at {admin} ({exc}): scripts/test installs and"
                " starts it; or set IOTMESH_TEST_PG_URL"
            ) from exc
        return server

    def drop(self) -> None:
        self.admin(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')

    def admin(self, statement: str) -> None:
        """Run a statement on the server's admin database (the database of the URL)."""
        asyncio.run(self._admin(statement))

    async def _admin(self, statement: str) -> None:
        conn = await asyncpg.connect(self.admin_url, timeout=10)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    def settings(self, name: str, **changes: object) -> PostgresSettings:
        """Settings for a schema of its own, named after `name` (e.g. a test's tmp dir):
        the same name gives the same schema, so a test can reopen a store."""
        schema = "t_" + hashlib.sha1(name.encode()).hexdigest()[:20]
        fields: dict[str, object] = {"url": self.url, "schema_name": schema, "pool_size": 4}
        return PostgresSettings.model_validate(fields | changes)
