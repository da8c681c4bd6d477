"""Session.deliver(message, confirm): the future follows the message to the client's
acknowledgement, and fails when the message cannot get there."""

from __future__ import annotations

import asyncio

import pytest

from iotmesh.core.errors import DeviceGone, PayloadError
from iotmesh.proto.mqtt import Publish
from iotmesh.transports.mqtt.session import Session


class Conn:
    """A connection with room for `window` unacknowledged messages."""

    def __init__(self, window: int = 1, max_size: int | None = None) -> None:
        self.window = window
        self.max_size = max_size
        self.sent: list[Publish] = []

    def can_send(self, inflight: int) -> bool:
        return inflight < self.window

    def send_publish(self, message: Publish) -> bool:
        if self.max_size is not None and len(message.payload) > self.max_size:
            return False
        self.sent.append(message)
        return True


def _session(conn: Conn | None) -> Session:
    session = Session("c1", max_queued=2)
    session.connection = conn  # type: ignore[assignment]
    return session


def _future() -> asyncio.Future[None]:
    return asyncio.get_running_loop().create_future()


async def test_qos0_is_confirmed_when_written() -> None:
    conn = Conn()
    confirm = _future()
    _session(conn).deliver(Publish("t", b"x", 0), confirm)
    assert confirm.done()
    assert confirm.result() is None


async def test_qos1_waits_for_puback_also_behind_the_window() -> None:
    conn = Conn(window=1)
    session = _session(conn)
    first, second = _future(), _future()
    session.deliver(Publish("t", b"1", 1), first)
    session.deliver(Publish("t", b"2", 1), second)  # queued: the window is full
    assert not first.done()
    assert len(conn.sent) == 1
    session.acknowledged(conn.sent[0].packet_id or 0)
    assert first.done()
    assert not second.done()  # sent now, waiting for its own PUBACK
    assert len(conn.sent) == 2
    session.acknowledged(conn.sent[1].packet_id or 0)
    assert second.done()


async def test_qos2_is_confirmed_at_pubrec() -> None:
    conn = Conn()
    session = _session(conn)
    confirm = _future()
    session.deliver(Publish("t", b"x", 2), confirm)
    assert session.received(conn.sent[0].packet_id or 0)
    assert confirm.done()


async def test_connection_end_fails_unconfirmed_messages() -> None:
    conn = Conn(window=1)
    session = _session(conn)
    inflight, queued = _future(), _future()
    session.deliver(Publish("t", b"1", 1), inflight)
    session.deliver(Publish("t", b"2", 1), queued)
    session.detach()
    for confirm in (inflight, queued):
        with pytest.raises(DeviceGone):
            confirm.result()


async def test_dropped_or_undeliverable_messages_fail() -> None:
    for qos in (0, 1):
        offline = _future()
        session = _session(None)
        session.deliver(Publish("t", b"x", qos), offline)
        with pytest.raises(DeviceGone):
            offline.result()
        assert not session.queue  # the sender keeps it, not the offline session
    too_large = _future()
    _session(Conn(max_size=1)).deliver(Publish("t", b"xx", 1), too_large)
    with pytest.raises(PayloadError):
        too_large.result()
    session = _session(Conn(window=0))  # nothing goes out: all queue (at most 2)
    confirms = [_future() for _ in range(3)]
    for n, confirm in enumerate(confirms):
        session.deliver(Publish("t", bytes([n]), 1), confirm)
    with pytest.raises(DeviceGone, match="queue full"):
        confirms[2].result()
    assert not confirms[0].done()
