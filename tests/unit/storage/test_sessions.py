"""The SQLite MQTT session store: what is written is what loads, in order, atomically;
retained messages too; a file of an older schema is upgraded in place."""

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
    RetainDelete,
    RetainPut,
    SaveSession,
    StoredMessage,
    StoredRetained,
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


# -- retained messages ----------------------------------------------------------------------


def retained(topic: str, payload: bytes = b"on", **kwargs: object) -> StoredRetained:
    return StoredRetained(topic, payload, 1, stored_ms=1_700_000_000_000, **kwargs)  # type: ignore[arg-type]


async def test_retained_messages_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "mqtt-sessions.sqlite"
    store = SqliteSessionStore(path)
    await store.open()
    messages = [
        retained("b/2", b"\x00\xff", properties=b"\x81\xa1k\x01"),
        StoredRetained("a/1", b"x" * 100_000, 2, None, 5),
        StoredRetained("c", b"zero", 0, None, 6),
    ]
    await store.write([RetainPut(m) for m in messages])
    store = await reopen(store, path)
    try:
        assert await store.load_retained() == sorted(messages, key=lambda m: m.topic)
    finally:
        await store.close()


async def test_one_retained_message_per_topic_the_last_one_written(
    store: SqliteSessionStore,
) -> None:
    await store.write([RetainPut(retained("t", b"first"))])
    await store.write([RetainPut(retained("t", b"second")), RetainPut(retained("t", b"third"))])
    assert await store.load_retained() == [retained("t", b"third")]


async def test_retained_delete_and_an_empty_payload_clear_the_topic(
    store: SqliteSessionStore,
) -> None:
    await store.write([RetainPut(retained(t)) for t in ("a", "b", "c")])
    # An empty retained payload means "no retained message" (MQTT 3.3.1.3).
    await store.write(
        [RetainDelete("a"), RetainPut(retained("b", b"")), RetainDelete("never-retained")]
    )
    assert await store.load_retained() == [retained("c")]


async def test_retained_changes_share_the_transaction_of_session_changes(
    store: SqliteSessionStore,
) -> None:
    await store.write([SaveSession(session("c1")), RetainPut(retained("kept"))])
    bad = StoredMessage(1, "t", None, 1)  # type: ignore[arg-type]  # NOT NULL payload
    with pytest.raises(StorageError):
        await store.write([RetainDelete("kept"), RetainPut(retained("new")), QueuePut("c1", [bad])])
    assert await store.load_retained() == [retained("kept")]
    await store.write([QueuePut("c1", [message(1)]), RetainPut(retained("new"))])
    [record] = await store.load_all()
    assert record.messages == [message(1)]
    assert [m.topic for m in await store.load_retained()] == ["kept", "new"]


async def test_retained_messages_do_not_belong_to_sessions(store: SqliteSessionStore) -> None:
    """Deleting every session (and the orphan clean-up at open) keeps them."""
    await store.write([SaveSession(session("c1")), RetainPut(retained("t"))])
    await store.write([DeleteSession("c1")])
    assert await store.load_all() == []
    assert await store.load_retained() == [retained("t")]


def _schema_1(path: Path) -> None:
    """A file as the release before retained messages wrote it: schema 1, one session
    with a subscription and a queued message."""
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript(f"BEGIN; {MIGRATIONS[0]}; PRAGMA user_version = 1; COMMIT;")
    db.execute("INSERT INTO sessions VALUES ('c1', 'dev-1', 5, 60, 1700000000000)")
    db.execute("INSERT INTO subscriptions VALUES ('c1', 'a/+', 1, 0, 0, 0, NULL, NULL)")
    db.execute("INSERT INTO queue VALUES (7, 'c1', 'a/b', X'6869', 1, 1, NULL, 1000, NULL, 0)")
    db.close()


async def test_a_schema_1_file_is_upgraded_in_place(tmp_path: Path) -> None:
    path = tmp_path / "mqtt-sessions.sqlite"
    _schema_1(path)
    store = SqliteSessionStore(path)
    await store.open()
    try:
        [record] = await store.load_all()
        assert record.session == session("c1", StoredSubscription("a/+", 1))
        assert record.messages == [StoredMessage(7, "a/b", b"hi", 1, retain=True, queued_ms=1000)]
        assert await store.load_retained() == []
        await store.write([RetainPut(retained("t"))])
        assert await store.load_retained() == [retained("t")]
    finally:
        await store.close()
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS) == 2
    finally:
        db.close()
    # Opening the upgraded file again applies nothing twice.
    store = SqliteSessionStore(path)
    await store.open()
    try:
        assert await store.load_retained() == [retained("t")]
        assert len(await store.load_all()) == 1
    finally:
        await store.close()
