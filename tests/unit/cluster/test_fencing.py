"""The SQL fence, on SQLite (the statement is also valid PostgreSQL)."""

from __future__ import annotations

import sqlite3

import pytest

from iotmesh.cluster import StaleToken, fenced_sqlite
from iotmesh.cluster.fencing import FENCES_TABLE


def test_a_stale_token_is_refused_and_its_transaction_rolls_back() -> None:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.execute(FENCES_TABLE)
    conn.execute("CREATE TABLE jobs (name TEXT PRIMARY KEY, ran_by INTEGER)")

    def run(token: int) -> None:
        conn.execute("BEGIN")
        try:
            fenced_sqlite(conn, "retention", token)
            conn.execute("INSERT OR REPLACE INTO jobs VALUES ('retention', ?)", (token,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    run(3)
    run(3)
    run(7)
    with pytest.raises(StaleToken) as caught:
        run(3)
    assert (caught.value.token, caught.value.highest) == (3, 7)
    assert conn.execute("SELECT ran_by FROM jobs").fetchone() == (7,)
