"""The SQLite MQTT session store: what is written is what loads, in order, atomically."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from iotmesh.core.errors import StorageError
from iotmesh.storage.sessions import (
    DeleteSession,
    QueuePut,
    QueueRemove,
    SaveSession,
    StoredMessage,
    StoredSession,
    StoredSubscription,
)
from iotmesh.storage.sqlite.sessions import MIGRATIONS, SqliteSessionStore


def session(client_id: str, *subs: StoredSubscription, expiry: int = 60) -> StoredSession:
    return StoredSession(client_id, "dev-1", 5, expiry, 1_700_000_000_000, list(subs))


def message(seq: int, topic: str = "t", **kwargs: object) -> StoredMessage:
    return StoredMessage(seq, topic, f"m{seq}".encode(), 1, queued_ms=1000 + seq, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteSessionStore]:
    s = SqliteSessionStore(tmp_path / "mqtt-sessions.sqlite")
    await s.open()
    try:
        yield s
    finally:
        await s.close()


async def reopen(store: SqliteSessionStore, path: Path) -> SqliteSessionStore:
    await store.close()
    fresh = SqliteSessionStore(path)
    await fresh.open()
    return fresh


async def test_empty_store_loads_nothing(store: SqliteSessionStore) -> None:
    assert await store.load_all() == []


async def test_session_subscriptions_and_messages_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "mqtt-sessions.sqlite"
    store = SqliteSessionStore(path)
    await store.open()
    subs = [
        StoredSubscription("a/+", 1),
        StoredSubscription("$share/g/b/#", 2, False, True, 1, identifier=7, shared_group="g"),
        StoredSubscription("v1/devices/me/attributes", 1, no_local=True, retain_handling=2),
    ]
    messages = [
        message(1, properties=b"\x81\xa1k\x01"),
        message(2, retain=True),
        message(3, packet_id=12),
        StoredMessage(4, "", b"", 2, packet_id=13, released=True),
    ]
    await store.write([SaveSession(session("c1", *subs)), QueuePut("c1", messages)])
    store = await reopen(store, path)
    try:
        [record] = await store.load_all()
    finally:
        await store.close()
    assert record.session == session("c1", *sorted(subs, key=lambda s: s.topic_filter))
    assert record.messages == messages


async def test_saving_again_replaces_subscriptions_and_keeps_messages(
    store: SqliteSessionStore,
) -> None:
    await store.write(
        [SaveSession(session("c1", StoredSubscription("a", 1))), QueuePut("c1", [message(1)])]
    )
    again = StoredSession("c1", None, 4, 30, None, [StoredSubscription("b", 2)])
    await store.write([SaveSession(again)])
    [record] = await store.load_all()
    assert record.session == again
    assert record.messages == [message(1)]


async def test_messages_load_in_seq_order_per_session(store: SqliteSessionStore) -> None:
    await store.write(
        [
            SaveSession(session("a")),
            SaveSession(session("b")),
            QueuePut("a", [message(5), message(2)]),
            QueuePut("b", [message(3)]),
            QueuePut("a", [message(9)]),
        ]
    )
    loaded = {r.session.client_id: [m.seq for m in r.messages] for r in await store.load_all()}
    assert loaded == {"a": [2, 5, 9], "b": [3]}


async def test_put_with_a_known_seq_replaces_the_message(store: SqliteSessionStore) -> None:
    await store.write([SaveSession(session("c1")), QueuePut("c1", [message(1), message(2)])])
    await store.write([QueuePut("c1", [message(1, packet_id=4)])])
    [record] = await store.load_all()
    assert record.messages == [message(1, packet_id=4), message(2)]


async def test_remove_takes_only_the_named_messages_of_that_client(
    store: SqliteSessionStore,
) -> None:
    await store.write(
        [
            SaveSession(session("a")),
            SaveSession(session("b")),
            QueuePut("a", [message(1), message(2), message(3)]),
            QueuePut("b", [message(4)]),
        ]
    )
    await store.write([QueueRemove("a", [1, 3, 4, 99])])
    loaded = {r.session.client_id: [m.seq for m in r.messages] for r in await store.load_all()}
    assert loaded == {"a": [2], "b": [4]}


async def test_delete_forgets_session_subscriptions_and_messages(
    store: SqliteSessionStore, tmp_path: Path
) -> None:
    await store.write(
        [SaveSession(session("a", StoredSubscription("x", 1))), QueuePut("a", [message(1)])]
    )
    await store.write([DeleteSession("a"), DeleteSession("never-existed")])
    assert await store.load_all() == []
    db = sqlite3.connect(tmp_path / "mqtt-sessions.sqlite")
    counts = [
        db.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("subscriptions", "queue")
    ]
    db.close()
    assert counts == [0, 0]


async def test_ops_apply_in_order_within_one_write(store: SqliteSessionStore) -> None:
    """A clean start replacing a session: delete, then save the new one, in one batch."""
    await store.write(
        [SaveSession(session("c1", StoredSubscription("old", 1))), QueuePut("c1", [message(1)])]
    )
    await store.write(
        [DeleteSession("c1"), SaveSession(session("c1", StoredSubscription("new", 0)))]
    )
    [record] = await store.load_all()
    assert [s.topic_filter for s in record.session.subscriptions] == ["new"]
    assert record.messages == []


async def test_a_failing_write_applies_nothing(store: SqliteSessionStore) -> None:
    await store.write([SaveSession(session("c1"))])
    bad = StoredMessage(1, "t", None, 1)  # type: ignore[arg-type]  # NOT NULL payload
    with pytest.raises(StorageError):
        await store.write([DeleteSession("c1"), QueuePut("c1", [bad])])
    assert [r.session.client_id for r in await store.load_all()] == ["c1"]


async def test_orphaned_messages_are_dropped_on_open(tmp_path: Path) -> None:
    path = tmp_path / "mqtt-sessions.sqlite"
    store = SqliteSessionStore(path)
    await store.open()
    await store.write([QueuePut("nobody", [message(1)]), SaveSession(session("c1"))])
    store = await reopen(store, path)
    try:
        [record] = await store.load_all()
    finally:
        await store.close()
    assert record.messages == []


async def test_schema_version_is_recorded_and_a_newer_one_refused(tmp_path: Path) -> None:
    path = tmp_path / "mqtt-sessions.sqlite"
    store = SqliteSessionStore(path)
    await store.open()
    await store.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    db.close()
    newer = SqliteSessionStore(path)
    with pytest.raises(StorageError, match="newer than this release"):
        await newer.open()
    await newer.close()


async def test_use_before_open_is_a_storage_error(tmp_path: Path) -> None:
    store = SqliteSessionStore(tmp_path / "x.sqlite")
    with pytest.raises(StorageError, match="not open"):
        await store.load_all()
