"""Numbered schema migrations for every SQLite file of iotmesh (time series, state,
MQTT sessions): `PRAGMA user_version` is the number of migrations applied."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from iotmesh.core.errors import StorageError


def apply(conn: sqlite3.Connection, migrations: Sequence[str], name: str) -> None:
    """Apply every migration newer than the file's `user_version`, each in its own
    transaction with the version bump.

    Raises:
        StorageError: the file `name` has a newer schema than this release knows.
    """
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    if version > len(migrations):
        raise StorageError(
            f"{name} has schema {version}, newer than this release knows ({len(migrations)})"
        )
    for number, script in enumerate(migrations[version:], start=version + 1):
        conn.executescript(f"BEGIN; {script}; PRAGMA user_version = {number}; COMMIT;")
