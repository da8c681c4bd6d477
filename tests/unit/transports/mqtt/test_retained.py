"""Retained messages: the broker's v5 message expiry, what it tells its keeper, when the
publisher's ack may go, and retained messages written to a real SQLite session store
and loaded again."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from iotmesh.core.settings import MqttSettings
from iotmesh.proto.mqtt import Properties, Publish, ReasonCode
from iotmesh.storage.sessions import (
    RetainDelete,
    RetainPut,
    SessionRecord,
    SessionWrite,
    StoredRetained,
)
from iotmesh.storage.sqlite.sessions import SqliteSessionStore
from iotmesh.transports.mqtt.broker import Broker
from iotmesh.transports.mqtt.persistence import SessionPersistence
from iotmesh.transports.mqtt.server import ServerContext


class Keeper:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def retained(self, message: Publish) -> None:
        self.calls.append(("retained", message.topic))

    def retain_cleared(self, topic: str) -> None:
        self.calls.append(("cleared", topic))


def retained(topic: str, payload: bytes = b"on", qos: int = 1, **props: object) -> Publish:
    return Publish(topic, payload, qos, True, False, None, Properties(**props))  # type: ignore[arg-type]


def test_the_keeper_hears_of_every_retained_message_and_every_clear() -> None:
    keeper = Keeper()
    broker = Broker(keeper=keeper)
    broker.publish(retained("a"), None)
    broker.publish(Publish("a", b"not retained", 1), None)
    broker.publish(retained("a", b""), None)
    broker.publish(retained("b", b"", qos=0), None)  # nothing held: told all the same
    assert keeper.calls == [("retained", "a"), ("cleared", "a"), ("cleared", "b")]
    assert broker.retained_for("#") == []


def test_a_retained_message_is_sent_with_the_expiry_it_has_left() -> None:
    broker = Broker()
    broker.load(retained("t", message_expiry_interval=10), time.monotonic() - 4.5)
    broker.load(retained("u"), time.monotonic() - 10_000)  # no expiry: kept for ever
    got = {m.topic: m for m in broker.retained_for("#")}
    assert got["t"].properties.message_expiry_interval == 6
    assert got["t"].retain
    assert got["u"].properties.message_expiry_interval is None


def test_an_expired_retained_message_is_not_sent_and_is_dropped() -> None:
    keeper = Keeper()
    broker = Broker(keeper=keeper)
    broker.load(retained("t", message_expiry_interval=10), time.monotonic() - 10.5)
    broker.load(retained("u", message_expiry_interval=10), time.monotonic())
    assert [m.topic for m in broker.retained_for("t")] == []
    assert keeper.calls == [("cleared", "t")]
    assert [m.topic for m in broker.retained_for("#")] == ["u"]


def test_the_expiry_sweep_drops_only_what_is_due() -> None:
    keeper = Keeper()
    broker = Broker(keeper=keeper)
    now = time.monotonic()
    broker.load(retained("due", message_expiry_interval=5), now - 6)
    broker.load(retained("later", message_expiry_interval=5), now)
    broker.load(retained("never"), now - 1000)
    broker.publish(retained("due2", message_expiry_interval=1), None)
    assert broker.expire_retained(now + 1.5) == 2
    assert keeper.calls == [("retained", "due2"), ("cleared", "due"), ("cleared", "due2")]
    assert sorted(m.topic for m in broker.retained_for("#")) == ["later", "never"]
    # Retained again without an expiry: the sweep leaves it alone.
    broker.publish(retained("later"), None)
    assert broker.expire_retained(now + 100) == 0


# -- the publisher's ack ------------------------------------------------------------------


class GatedStore:
    """A session store whose writes wait for `gate`."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.writes: list[list[SessionWrite]] = []

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
        self.writes.append(list(ops))


class Publisher:
    """The side of a connection `ServerContext.route` talks to."""

    def __init__(self) -> None:
        self.session = None
        self.version = 5
        self.acked: list[tuple[Any, ReasonCode]] = []

    def complete(self, slot: Any, reason: ReasonCode = ReasonCode.SUCCESS) -> None:
        if slot is not None:
            self.acked.append((slot, reason))


async def test_the_ack_of_a_retained_qos_1_message_waits_for_the_store() -> None:
    store = GatedStore()
    ctx = ServerContext(MqttSettings(), None, None, store)  # type: ignore[arg-type]
    assert ctx.persistence is not None
    ctx.persistence.journal.start()
    try:
        conn = Publisher()
        ctx.route(conn, retained("t", b"on"), "slot-1")  # type: ignore[arg-type]
        ctx.route(conn, Publish("t", b"not retained", 1), "slot-2")  # type: ignore[arg-type]
        ctx.route(conn, retained("t", b""), "slot-3")  # type: ignore[arg-type]
        await asyncio.sleep(0.01)
        assert [slot for slot, _ in conn.acked] == ["slot-2"]  # nothing to store for it
        store.gate.set()
        assert await ctx.persistence.journal.flushed()
        assert [slot for slot, _ in conn.acked] == ["slot-2", "slot-1", "slot-3"]
        assert conn.acked[1][1] == ReasonCode.NO_MATCHING_SUBSCRIBERS
    finally:
        store.gate.set()
        await ctx.persistence.journal.close()
    # All three came in one turn of the loop: the clear took the place of the put.
    assert store.writes == [[RetainDelete("t")]]


async def test_a_retained_qos_0_message_is_written_without_anyone_waiting() -> None:
    store = GatedStore()
    store.gate.set()
    ctx = ServerContext(MqttSettings(), None, None, store)  # type: ignore[arg-type]
    assert ctx.persistence is not None
    ctx.persistence.journal.start()
    try:
        ctx.route(Publisher(), retained("t", b"zero", qos=0), None)  # type: ignore[arg-type]
        for _ in range(10):
            if store.writes:
                break
            await asyncio.sleep(0)
    finally:
        await ctx.persistence.journal.close()
    [[put]] = store.writes
    assert isinstance(put, RetainPut)
    assert (put.message.topic, put.message.payload, put.message.qos) == ("t", b"zero", 0)


# -- written and loaded again -----------------------------------------------------------------


async def open_persistence(path: Path) -> tuple[SessionPersistence, SqliteSessionStore]:
    store = SqliteSessionStore(path)
    await store.open()
    p = SessionPersistence(store, 10, lambda session: None)
    p.journal.start()
    return p, store


async def test_retained_messages_load_again_with_their_properties(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    p, store = await open_persistence(path)
    broker = Broker(keeper=p)
    props = {
        "content_type": "text/plain",
        "user_properties": [("k", "v")],
        "payload_format_indicator": 1,
        "response_topic": "r",
        "correlation_data": b"\x01",
        "message_expiry_interval": 3600,
    }
    broker.publish(retained("a/v5", b"props", 2, **props), None)
    broker.publish(retained("a/qos0", b"zero", 0), None)
    broker.publish(retained("a/cleared", b"soon gone"), None)
    broker.publish(retained("a/cleared", b""), None)
    assert await p.journal.flushed()
    await p.journal.close()
    await store.close()

    p, store = await open_persistence(path)
    try:
        fresh = Broker(keeper=p)
        await p.restore_retained(fresh)
        got = {m.topic: m for m in fresh.retained_for("a/#")}
    finally:
        await p.journal.close()
        await store.close()
    assert sorted(got) == ["a/qos0", "a/v5"]
    assert (got["a/qos0"].payload, got["a/qos0"].qos) == (b"zero", 0)
    v5 = got["a/v5"]
    assert (v5.payload, v5.qos, v5.retain) == (b"props", 2, True)
    expiry = v5.properties.message_expiry_interval
    assert expiry is not None
    assert 3590 < expiry <= 3600
    v5.properties.message_expiry_interval = 3600
    assert v5.properties == Properties(**props)  # type: ignore[arg-type]


async def test_retained_messages_that_expired_while_stopped_are_deleted_at_load(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.sqlite"
    p, store = await open_persistence(path)
    broker = Broker(keeper=p)
    broker.publish(retained("gone", message_expiry_interval=60), None)
    broker.publish(retained("left", message_expiry_interval=60), None)
    broker.publish(retained("old"), None)  # no expiry
    await p.journal.close()
    await store.close()
    # The server was stopped for a while: 61 s for one, 50 s for another, years for "old".
    db = sqlite3.connect(path)
    with db:
        for topic, seconds in [("gone", 61), ("left", 50), ("old", 1e8)]:
            db.execute(
                "UPDATE retained SET stored_ms = stored_ms - ? WHERE topic = ?",
                (int(seconds * 1000), topic),
            )
    db.close()

    p, store = await open_persistence(path)
    try:
        broker = Broker(keeper=p)
        await p.restore_retained(broker)
        got = {m.topic: m.properties.message_expiry_interval for m in broker.retained_for("#")}
    finally:
        await p.journal.close()
        await store.close()
    assert got.keys() == {"left", "old"}
    assert got["old"] is None
    assert got["left"] is not None
    assert 5 <= got["left"] <= 10
    store = SqliteSessionStore(path)
    await store.open()
    try:
        assert [m.topic for m in await store.load_retained()] == ["left", "old"]
    finally:
        await store.close()
