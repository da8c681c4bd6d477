"""Fencing tokens: a write made by a leader that no longer leads is refused.

A leader can be paused (GC, a stalled VM, a partition) past its lease while another
instance is elected; when it wakes up it still believes it leads. Each term of a lease
comes with a token larger than every earlier one (`election.py`), and every write of
a singleton job carries it. The store remembers the highest token seen per resource
and refuses a write with a smaller one (`StaleToken`), atomically with the write.

Two forms:

- `Fence` on the cluster engine: `write(resource, token, value)` stores `value` under
  `resource` only if `token` is not older than the highest seen (Redis: one Lua
  script over a hash {token, value}; NATS KV: compare-and-set on the entry's
  revision, the token inside the value; Kubernetes: compare-and-set on a Lease
  object's resourceVersion, token and value in annotations).
- SQL stores: keep a `fences` table and run `FENCE_SQL` in the same transaction as
  the job's writes; when it changed no row the token is stale and the transaction
  must roll back (`fenced_sqlite` does this for sqlite3). The statement is standard
  `INSERT ... ON CONFLICT DO UPDATE ... WHERE`, valid on SQLite >= 3.24 and
  PostgreSQL (with `%s` placeholders there). For a table of the job's own rows the
  same idea is a `fencing_token` column and `UPDATE ... WHERE fencing_token <= ?`.
"""

from __future__ import annotations

import abc
import sqlite3

from iotmesh.cluster.errors import StaleToken

FENCES_TABLE = "CREATE TABLE IF NOT EXISTS fences (resource TEXT PRIMARY KEY, token INTEGER)"

# Records `token` for `resource` unless a larger one is recorded: 1 row changed when the
# token is current (or newer), 0 rows when it is stale.
FENCE_SQL = (
    "INSERT INTO fences (resource, token) VALUES (?, ?) "
    "ON CONFLICT (resource) DO UPDATE SET token = excluded.token "
    "WHERE excluded.token >= fences.token"
)


def fenced_sqlite(conn: sqlite3.Connection, resource: str, token: int) -> None:
    """Check `token` for `resource` inside the caller's open transaction.

    Raises:
        StaleToken: a newer leader already wrote; roll the transaction back.
    """
    if conn.execute(FENCE_SQL, (resource, token)).rowcount == 0:
        row = conn.execute("SELECT token FROM fences WHERE resource = ?", (resource,)).fetchone()
        raise StaleToken(resource, token, int(row[0]) if row else token)


class Fence(abc.ABC):
    """Writes guarded by fencing tokens, in the cluster engine."""

    @abc.abstractmethod
    async def write(self, resource: str, token: int, value: bytes) -> None:
        """Store `value` under `resource` if `token` is the highest seen so far (or equal).

        Raises:
            StaleToken: a write with a larger token came first; nothing is written.
        """

    @abc.abstractmethod
    async def read(self, resource: str) -> tuple[int, bytes] | None:
        """(token, value) of the last accepted write, or None."""
