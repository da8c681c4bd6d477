"""SQLite session store: persistent MQTT sessions and retained messages in
`mqtt-sessions.sqlite` of the data dir.

A file of its own, not tables in `state.db`: sessions change with every connect,
subscribe and offline message (and retained messages with every retained publish), and
those commits must not queue behind (or in front of) the state store's. WAL mode;
`synchronous` as for the other SQLite files.

Schema changes are numbered migrations (`PRAGMA user_version` holds the number applied),
as in the state store. All SQLite work runs on one dedicated thread, never on the event
loop: one connection on one thread needs no locking.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path

from iotmesh.storage.sessions import (
    DeleteSession,
    QueuePut,
    QueueRemove,
    RetainPut,
    SaveSession,
    SessionRecord,
    SessionWrite,
    StoredMessage,
    StoredRetained,
    StoredSession,
    StoredSubscription,
)
from iotmesh.storage.sqlite import migrations
from iotmesh.storage.sqlite.db_thread import DbThread

FILE_NAME = "mqtt-sessions.sqlite"

# Migration N turns schema N-1 into schema N. Append only; never edit a released one.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE sessions (
        client_id         TEXT PRIMARY KEY,
        device_id         TEXT,
        protocol_version  INTEGER NOT NULL,
        expiry_s          INTEGER NOT NULL,
        disconnected_ms   INTEGER
    ) WITHOUT ROWID;
    CREATE TABLE subscriptions (
        client_id            TEXT NOT NULL,
        topic_filter         TEXT NOT NULL,
        qos                  INTEGER NOT NULL,
        no_local             INTEGER NOT NULL,
        retain_as_published  INTEGER NOT NULL,
        retain_handling      INTEGER NOT NULL,
        identifier           INTEGER,
        shared_group         TEXT,
        PRIMARY KEY (client_id, topic_filter)
    ) WITHOUT ROWID;
    -- seq is unique in the store, so it is the rowid; payloads stay out of the index.
    CREATE TABLE queue (
        seq         INTEGER PRIMARY KEY,
        client_id   TEXT NOT NULL,
        topic       TEXT NOT NULL,
        payload     BLOB NOT NULL,
        qos         INTEGER NOT NULL,
        retain      INTEGER NOT NULL,
        properties  BLOB,
        queued_ms   INTEGER NOT NULL,
        packet_id   INTEGER,
        released    INTEGER NOT NULL
    );
    CREATE INDEX queue_client ON queue (client_id, seq);
    """,
    # 2: retained messages, one per topic. A rowid table (the topic index apart), so
    # large payloads do not bloat a WITHOUT ROWID b-tree.
    """
    CREATE TABLE retained (
        topic       TEXT PRIMARY KEY,
        payload     BLOB NOT NULL,
        qos         INTEGER NOT NULL,
        properties  BLOB,
        stored_ms   INTEGER NOT NULL
    );
    """,
)


def migrate(conn: sqlite3.Connection) -> None:
    """Apply every migration newer than the database's `user_version`.

    Raises:
        StorageError: the file has a newer schema than this release knows.
    """
    migrations.apply(conn, MIGRATIONS, FILE_NAME)


class SqliteSessionStore:
    """`SessionStore` on one SQLite file."""

    def __init__(self, path: Path, synchronous: str = "FULL") -> None:
        self._path = path
        self._synchronous = synchronous
        self._thread = DbThread("session store")
        self._run = self._thread.run

    async def open(self) -> None:
        await self._thread.open(self._connect)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self._synchronous}")
            migrate(conn)
            # Messages whose session row is gone (nothing writes them, but a file edited
            # by hand could hold some) would never be delivered: drop them.
            conn.execute(
                "DELETE FROM queue WHERE client_id NOT IN (SELECT client_id FROM sessions)"
            )
        except BaseException:
            conn.close()
            raise
        return conn

    async def close(self) -> None:
        await self._thread.close()

    @property
    def _db(self) -> sqlite3.Connection:
        return self._thread.conn

    async def load_all(self) -> list[SessionRecord]:
        return await self._run(self._load_all)

    def _load_all(self) -> list[SessionRecord]:
        db = self._db
        records: dict[str, SessionRecord] = {}
        for row in db.execute(
            "SELECT client_id, device_id, protocol_version, expiry_s, disconnected_ms"
            " FROM sessions ORDER BY client_id"
        ):
            records[row[0]] = SessionRecord(StoredSession(*row), [])
        for row in db.execute(
            "SELECT client_id, topic_filter, qos, no_local, retain_as_published,"
            " retain_handling, identifier, shared_group FROM subscriptions"
            " ORDER BY client_id, topic_filter"
        ):
            record = records.get(row[0])
            if record is not None:
                record.session.subscriptions.append(
                    StoredSubscription(
                        row[1], row[2], bool(row[3]), bool(row[4]), row[5], row[6], row[7]
                    )
                )
        for row in db.execute(
            "SELECT client_id, seq, topic, payload, qos, retain, properties, queued_ms,"
            " packet_id, released FROM queue ORDER BY seq"
        ):
            record = records.get(row[0])
            if record is not None:
                record.messages.append(
                    StoredMessage(
                        row[1],
                        row[2],
                        bytes(row[3]),
                        row[4],
                        bool(row[5]),
                        None if row[6] is None else bytes(row[6]),
                        row[7],
                        row[8],
                        bool(row[9]),
                    )
                )
        return list(records.values())

    async def load_retained(self) -> list[StoredRetained]:
        return await self._run(self._load_retained)

    def _load_retained(self) -> list[StoredRetained]:
        return [
            StoredRetained(
                row[0], bytes(row[1]), row[2], None if row[3] is None else bytes(row[3]), row[4]
            )
            for row in self._db.execute(
                "SELECT topic, payload, qos, properties, stored_ms FROM retained ORDER BY topic"
            )
        ]

    async def write(self, ops: Sequence[SessionWrite]) -> None:
        if ops:
            await self._run(lambda: self._write(ops))

    def _write(self, ops: Sequence[SessionWrite]) -> None:
        db = self._db
        with db:
            db.execute("BEGIN IMMEDIATE")
            for op in ops:
                if isinstance(op, SaveSession):
                    _save(db, op.session)
                elif isinstance(op, DeleteSession):
                    _delete(db, op.client_id)
                elif isinstance(op, QueuePut):
                    _put(db, op)
                elif isinstance(op, QueueRemove):
                    _remove(db, op)
                elif isinstance(op, RetainPut):
                    _retain(db, op.message)
                else:
                    db.execute("DELETE FROM retained WHERE topic = ?", (op.topic,))


def _save(db: sqlite3.Connection, s: StoredSession) -> None:
    db.execute(
        "INSERT INTO sessions VALUES (?, ?, ?, ?, ?) ON CONFLICT (client_id) DO UPDATE SET"
        " device_id = excluded.device_id, protocol_version = excluded.protocol_version,"
        " expiry_s = excluded.expiry_s, disconnected_ms = excluded.disconnected_ms",
        (s.client_id, s.device_id, s.protocol_version, s.expiry_s, s.disconnected_ms),
    )
    db.execute("DELETE FROM subscriptions WHERE client_id = ?", (s.client_id,))
    db.executemany(
        "INSERT INTO subscriptions VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (
                s.client_id,
                sub.topic_filter,
                sub.qos,
                int(sub.no_local),
                int(sub.retain_as_published),
                sub.retain_handling,
                sub.identifier,
                sub.shared_group,
            )
            for sub in s.subscriptions
        ],
    )


def _delete(db: sqlite3.Connection, client_id: str) -> None:
    params = (client_id,)
    db.execute("DELETE FROM queue WHERE client_id = ?", params)
    db.execute("DELETE FROM subscriptions WHERE client_id = ?", params)
    db.execute("DELETE FROM sessions WHERE client_id = ?", params)


def _put(db: sqlite3.Connection, op: QueuePut) -> None:
    db.executemany(
        "INSERT OR REPLACE INTO queue VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (
                m.seq,
                op.client_id,
                m.topic,
                m.payload,
                m.qos,
                int(m.retain),
                m.properties,
                m.queued_ms,
                m.packet_id,
                int(m.released),
            )
            for m in op.messages
        ],
    )


def _remove(db: sqlite3.Connection, op: QueueRemove) -> None:
    db.executemany(
        "DELETE FROM queue WHERE seq = ? AND client_id = ?",
        [(seq, op.client_id) for seq in op.seqs],
    )


def _retain(db: sqlite3.Connection, m: StoredRetained) -> None:
    if not m.payload:  # MQTT 3.3.1.3: an empty retained payload clears the topic
        db.execute("DELETE FROM retained WHERE topic = ?", (m.topic,))
        return
    db.execute(
        "INSERT OR REPLACE INTO retained VALUES (?, ?, ?, ?, ?)",
        (m.topic, m.payload, m.qos, m.properties, m.stored_ms),
    )
