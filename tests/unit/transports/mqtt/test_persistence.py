"""Session persistence without a server: the journal's ordering, batching and failures,
and a session written on detach and loaded again from a real SQLite store."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from iotmesh.core.errors import StorageError
from iotmesh.proto.mqtt import Properties, Publish, Pubrel, Subscription
from iotmesh.storage.sessions import (
    DeleteSession,
    QueuePut,
    QueueRemove,
    RetainDelete,
    RetainPut,
    SaveSession,
    SessionRecord,
    SessionWrite,
    StoredMessage,
    StoredRetained,
    StoredSession,
)
from iotmesh.storage.sqlite.sessions import SqliteSessionStore
from iotmesh.transports.mqtt.persistence import SessionJournal, SessionPersistence
from iotmesh.transports.mqtt.session import Session, SubscriptionEntry, own_queue


class FakeStore:
    """Records each write; writes wait on `gate`; the next `failures` writes fail."""

    def __init__(self) -> None:
        self.writes: list[list[SessionWrite]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.failures = 0

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def load_all(self) -> list[SessionRecord]:
        return []

    async def load_retained(self) -> list[StoredRetained]:
        return []

    async def write(self, ops: Sequence[SessionWrite]) -> None:
        await self.gate.wait()
        if self.failures:
            self.failures -= 1
            raise StorageError("disk on fire")
        self.writes.append(list(ops))


@pytest.fixture
async def journal() -> AsyncIterator[tuple[SessionJournal, FakeStore]]:
    store = FakeStore()
    j = SessionJournal(store)
    j.start()
    try:
        yield j, store
    finally:
        await j.close()


def delete(client_id: str) -> DeleteSession:
    return DeleteSession(client_id)


async def test_changes_are_written_in_order_and_batched_while_a_write_runs(
    journal: tuple[SessionJournal, FakeStore],
) -> None:
    j, store = journal
    store.gate.clear()
    j.add(delete("a"))
    await asyncio.sleep(0)  # the first write starts and waits on the gate
    j.add(delete("b"))
    j.add(delete("c"))
    store.gate.set()
    assert await j.flushed()
    assert store.writes == [[delete("a")], [delete("b"), delete("c")]]


async def test_consecutive_queue_changes_of_one_client_are_merged(
    journal: tuple[SessionJournal, FakeStore],
) -> None:
    j, store = journal
    store.gate.clear()
    j.add(QueueRemove("a", [1]))
    await asyncio.sleep(0)
    j.add(QueueRemove("a", [2]))
    j.add(QueueRemove("a", [3]))
    j.add(QueueRemove("b", [4]))
    j.add(QueueRemove("a", [5]))
    store.gate.set()
    await j.flushed()
    assert store.writes[1] == [
        QueueRemove("a", [2, 3]),
        QueueRemove("b", [4]),
        QueueRemove("a", [5]),
    ]
    assert j.added == 5


def retain(topic: str, payload: bytes) -> RetainPut:
    return RetainPut(StoredRetained(topic, payload, 1))


async def test_pending_retained_changes_of_one_topic_keep_only_the_last(
    journal: tuple[SessionJournal, FakeStore],
) -> None:
    """A retained topic published over and over (QoS 0 waits for nobody) leaves one
    pending change per topic, not one per message."""
    j, store = journal
    store.gate.clear()
    j.add(retain("t", b"0"))
    await asyncio.sleep(0)  # the write of "0" is in progress: it is not changed any more
    j.add(retain("t", b"1"))
    j.add(delete("a"))
    j.add(retain("u", b"1"))
    j.add(RetainDelete("t"))
    j.add(retain("u", b"2"))
    j.add(retain("t", b"3"))
    store.gate.set()
    assert await j.flushed()
    assert store.writes == [
        [retain("t", b"0")],
        [retain("t", b"3"), delete("a"), retain("u", b"2")],
    ]
    assert j.added == 7
    j.add(RetainDelete("u"))  # a new batch: nothing pending to merge with
    assert await j.flushed()
    assert store.writes[2] == [RetainDelete("u")]


async def test_waiters_are_called_after_their_write_and_at_once_when_idle(
    journal: tuple[SessionJournal, FakeStore],
) -> None:
    j, store = journal
    calls: list[tuple[str, bool]] = []
    j.after_write(lambda ok: calls.append(("idle", ok)))
    assert calls == [("idle", True)]
    store.gate.clear()
    j.add(delete("a"))
    j.after_write(lambda ok: calls.append(("first", ok)))
    await asyncio.sleep(0)  # the write of "a" is in progress: a waiter added now waits for it
    j.after_write(lambda ok: calls.append(("during", ok)))
    assert calls == [("idle", True)]
    store.gate.set()
    await j.flushed()
    assert calls == [("idle", True), ("first", True), ("during", True)]


async def test_a_failed_write_tells_its_waiters_and_later_writes_go_on(
    journal: tuple[SessionJournal, FakeStore], caplog: pytest.LogCaptureFixture
) -> None:
    j, store = journal
    store.failures = 1
    j.add(delete("lost"))
    assert not await j.flushed()
    j.add(delete("kept"))
    assert await j.flushed()
    assert store.writes == [[delete("kept")]]
    assert j.failures == 1
    assert "writing 1 MQTT session changes failed" in caplog.text


async def test_close_writes_what_is_pending() -> None:
    store = FakeStore()
    j = SessionJournal(store)
    j.start()
    store.gate.clear()
    j.add(delete("a"))
    j.add(delete("b"))
    closing = asyncio.create_task(j.close())
    await asyncio.sleep(0.01)
    store.gate.set()
    await closing
    assert [op for batch in store.writes for op in batch] == [delete("a"), delete("b")]


# -- a session written and loaded again ---------------------------------------------------


class NoRegistry:
    async def get(self, device_id: str) -> Any:
        raise AssertionError("anonymous sessions need no registry")


def message(payload: bytes, qos: int = 1, **props: Any) -> Publish:
    return Publish("t/x", payload, qos, False, False, None, Properties(**props))


async def persistence(path: Path, max_queued: int = 10) -> tuple[SessionPersistence, Any]:
    store = SqliteSessionStore(path)
    await store.open()
    p = SessionPersistence(store, max_queued, lambda session: None)
    p.journal.start()
    return p, store


async def reload(path: Path, max_queued: int = 10) -> list[Session]:
    p, store = await persistence(path, max_queued)
    try:
        return await p.restore(NoRegistry())  # type: ignore[arg-type]
    finally:
        await p.journal.close()
        await store.close()


def offline_session(p: SessionPersistence) -> Session:
    session = Session("c1", 10, p)
    session.expiry_s = 3600
    session.version = 5
    options = Subscription("t/#", 2, True, True, 1)
    session.subscriptions["t/#"] = SubscriptionEntry(options, 9, None)
    p.save(session)
    session.detach()
    return session


async def test_a_detached_session_loads_again_with_everything_it_held(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    p, store = await persistence(path)
    session = Session("c1", 10, p)
    session.expiry_s = 3600
    session.version = 5
    options = Subscription("t/#", 2, True, True, 1)
    session.subscriptions["t/#"] = SubscriptionEntry(options, 9, None)
    p.save(session)
    # Held while "connected": two in flight (one of them past PUBREC), one queued.
    session.inflight[7] = Publish("t/x", b"in-flight", 1, False, False, 7, Properties())
    session.inflight[8] = Pubrel(8)
    session.queue = own_queue(session.queue)  # as Session does before it first queues
    session.queue.append((message(b"queued-online", 2, content_type="a/b"), 0.0, None))
    session.queue.append((message(b"qos0", 0), 0.0, None))
    session.detach()
    session.deliver(message(b"queued-offline", user_properties=[("k", "v")]))
    await p.journal.close()
    await store.close()

    [back] = await reload(path)
    assert (back.client_id, back.expiry_s, back.version) == ("c1", 3600, 5)
    assert back.stored
    assert back.connection is None
    entry = back.subscriptions["t/#"]
    assert (entry.options, entry.identifier, entry.shared_group) == (options, 9, None)
    assert back.inflight == {
        7: Publish("t/x", b"in-flight", 1, False, True, 7, Properties()),
        8: Pubrel(8),
    }
    queued = [(m.payload, m.qos, m.properties) for m, _, _ in back.queue]
    assert queued == [
        (b"queued-online", 2, Properties(content_type="a/b")),
        (b"queued-offline", 1, Properties(user_properties=[("k", "v")])),
    ]  # QoS 0 is not kept across a restart
    assert back.disconnected_at is not None
    assert not back.expired(back.disconnected_at + 3599)


async def test_acknowledged_and_expired_messages_leave_the_store(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    p, store = await persistence(path)
    session = offline_session(p)
    session.deliver(message(b"acked"))
    session.deliver(message(b"expired", message_expiry_interval=1))
    session.deliver(message(b"kept"))
    # Delivered to a client: the first is acknowledged, the second had expired.
    queue = list(session.queue)
    session.queue.clear()
    session.queue.extend([queue[0], (queue[1][0], queue[1][1] - 5, queue[1][2]), queue[2]])
    sent: list[Publish] = []

    class Conn:
        def can_send(self, inflight: int) -> bool:
            return inflight < 1

        def send_publish(self, m: Publish) -> bool:
            sent.append(m)
            return True

    session.connection = Conn()  # type: ignore[assignment]
    session.pump()
    assert [m.payload for m in sent] == [b"acked"]
    assert sent[0].packet_id is not None
    session.acknowledged(sent[0].packet_id)
    session.connection = None
    await p.journal.close()
    await store.close()
    [back] = await reload(path)
    assert [m.payload for m, _, _ in back.queue] == [b"kept"]


async def test_expired_sessions_are_deleted_at_load(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    p, store = await persistence(path)
    p.journal.add(SaveSession(StoredSession("old", None, 4, 60, 1_000)))  # gone since 1970
    p.journal.add(SaveSession(StoredSession("new", None, 4, 60, None)))  # connected at a crash
    p.journal.add(QueuePut("old", [StoredMessage(1, "t", b"x", 1)]))
    await p.journal.close()
    await store.close()
    assert [s.client_id for s in await reload(path)] == ["new"]
    assert [r.session.client_id for r in await _load(path)] == ["new"]
    # "new" was connected when written: it counts as disconnected at the load.
    [record] = await _load(path)
    assert record.session.disconnected_ms is not None


async def test_a_lowered_queue_limit_keeps_the_oldest_at_load(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    p, store = await persistence(path)
    session = offline_session(p)
    for i in range(5):
        session.deliver(message(f"m{i}".encode()))
    await p.journal.close()
    await store.close()
    [back] = await reload(path, max_queued=2)
    assert [m.payload for m, _, _ in back.queue] == [b"m0", b"m1"]
    assert back.dropped == 3
    [record] = await _load(path)
    assert [m.payload for m in record.messages] == [b"m0", b"m1"]


async def test_new_seqs_continue_after_the_stored_ones(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    p, store = await persistence(path)
    session = offline_session(p)
    session.deliver(message(b"a"))
    session.deliver(message(b"b"))
    await p.journal.close()
    await store.close()
    p, store = await persistence(path)
    try:
        [back] = await p.restore(NoRegistry())  # type: ignore[arg-type]
        back.deliver(message(b"c"))
        assert [seq for _, _, seq in back.queue] == [1, 2, 3]
    finally:
        await p.journal.close()
        await store.close()
    [record] = await _load(path)
    assert [m.payload for m in record.messages] == [b"a", b"b", b"c"]


async def _load(path: Path) -> list[SessionRecord]:
    store = SqliteSessionStore(path)
    await store.open()
    try:
        return await store.load_all()
    finally:
        await store.close()


def test_sessions_share_one_empty_queue_until_they_queue_something() -> None:
    """~760 bytes less per idle client: the shared queue refuses to hold anything."""
    quiet, busy = Session("quiet", 10), Session("busy", 10)
    assert quiet.queue is busy.queue
    with pytest.raises(TypeError):
        quiet.queue.append((message(b"x"), 0.0, None))
    busy.deliver(message(b"queued"))  # offline: queued in a deque of its own
    assert [m.payload for m, _, _ in busy.queue] == [b"queued"]
    assert not quiet.queue
