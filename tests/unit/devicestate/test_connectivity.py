"""ConnectivityService: sessions, activity and the inactivity timeout on a fake clock."""

from __future__ import annotations

from pathlib import Path

from iotmesh.devicestate import Connectivity, ConnectivityService
from iotmesh.registry import DeviceRegistry
from iotmesh.storage.sqlite.state import SqliteStateStore

T0 = 1_700_000_000_000


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now


def test_unknown_device_is_offline() -> None:
    service = ConnectivityService(600, Clock())
    assert service.state("nobody") == Connectivity(False, None, 0, 0, 0, 0)


def test_a_live_session_keeps_a_device_online_past_the_timeout() -> None:
    clock = Clock()
    service = ConnectivityService(10, clock)
    service.opened("d", "mqtt")
    clock.now += 60_000
    state = service.state("d")
    assert state.online
    assert state.sessions == 1
    assert state.transport == "mqtt"
    assert state.last_connect_ts == state.last_activity_ts == T0
    service.activity("d", "mqtt")
    assert service.state("d").last_activity_ts == T0 + 60_000
    clock.now += 1
    service.closed("d", "mqtt")
    state = service.state("d")
    assert state.sessions == 0
    assert state.last_disconnect_ts == T0 + 60_001
    assert state.online  # heard from 1 ms ago
    clock.now += 10_000
    assert not service.state("d").online


def test_activity_alone_counts_until_the_inactivity_timeout() -> None:
    clock = Clock()
    service = ConnectivityService(10, clock)
    service.activity("d", "coap")
    assert service.state("d").online
    clock.now += 9_999
    assert service.state("d").online
    clock.now += 1
    assert not service.state("d").online
    assert service.stats() == {"devices_seen": 1, "online": 0}


def test_sessions_are_counted_per_transport_and_closes_are_not_overcounted() -> None:
    clock = Clock()
    service = ConnectivityService(10, clock)
    service.opened("d", "mqtt")
    service.opened("d", "coap")
    service.closed("d", "mqtt")
    service.closed("d", "mqtt")  # a second close of the same session: ignored
    assert service.state("d").sessions == 1
    clock.now += 60_000
    assert service.state("d").online  # the CoAP observation is still open
    service.closed("d", "coap")
    service.closed("other", "mqtt")  # never opened: ignored
    assert not service.state("d").online
    service.forget("d")
    assert service.state("d") == Connectivity(False, None, 0, 0, 0, 0)


async def test_saved_and_loaded_across_a_restart(tmp_path: Path) -> None:
    clock = Clock()
    state = SqliteStateStore(tmp_path / "state.db", synchronous="OFF")
    registry = DeviceRegistry(state)
    await registry.start()
    try:
        kept = await registry.create("kept")
        deleted = await registry.create("deleted")
        service = ConnectivityService(10, clock, store=state, save_interval_s=3600)
        await service.start()
        service.opened(kept.id, "mqtt")
        clock.now += 5
        service.activity(kept.id, "mqtt")
        service.closed(kept.id, "mqtt")
        service.activity(deleted.id, "coap")
        await registry.delete(deleted.id)  # its activity is skipped, not an error
        await service.stop()

        again = ConnectivityService(10, clock, store=state)
        await again.start()
        try:
            state_now = again.state(kept.id)
            assert state_now == Connectivity(True, "mqtt", T0 + 5, T0, T0 + 5, 0)
            clock.now += 10_000
            assert not again.state(kept.id).online
            assert again.state(deleted.id).last_activity_ts == 0
        finally:
            await again.stop()
    finally:
        await registry.stop()
