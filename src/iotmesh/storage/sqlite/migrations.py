"""Numbered schema migrations for every SQLite file of iotmesh (time series, state,
MQTT sessions): `PRAGMA user_version` is the number of migrations applied."""

from __future__ import annotations

import contextlib
import fcntl
import sqlite3
from collections.abc import Iterator, Sequence

from iotmesh.core.errors import StorageError


@contextlib.contextmanager
def _exclusive(conn: sqlite3.Connection) -> Iterator[None]:
    """Hold `<file>.migrate-lock` (flock): with `iotmesh serve`, several processes open
    one file at start-up, and only one may migrate it; the others then see it current."""
    path = conn.execute("PRAGMA database_list").fetchone()[2]
    if not path:  # an in-memory database: nobody else sees it
        yield
        return
    with open(f"{path}.migrate-lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def apply(conn: sqlite3.Connection, migrations: Sequence[str], name: str) -> None:
    """Apply every migration newer than the file's `user_version`, each in its own
    transaction with the version bump (one process at a time).

    Raises:
        StorageError: the file `name` has a newer schema than this release knows.
    """
    with _exclusive(conn):
        _apply(conn, migrations, name)


def _apply(conn: sqlite3.Connection, migrations: Sequence[str], name: str) -> None:
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    if version > len(migrations):
        raise StorageError(
            f"{name} has schema {version}, newer than this release knows ({len(migrations)})"
        )
    for number, script in enumerate(migrations[version:], start=version + 1):
        conn.executescript(f"BEGIN; {script}; PRAGMA user_version = {number}; COMMIT;")
