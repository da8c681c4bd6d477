"""The discovery client over a registry double, on a fake clock.

The network part (a real registry on Redis/NATS, real HTTP servers) is covered by
tests/contract/test_cluster.py and tests/integration/test_cluster.py.
"""

from __future__ import annotations

import asyncio
import builtins

import msgspec
import pytest

from iotmesh.cluster import CallFailed, Discovery, Instance, NoInstance, Registry
from iotmesh.core.settings import ClusterSettings

SETTINGS = ClusterSettings(
    heartbeat_interval_s=1.0,
    ttl_s=10.0,
    phi_threshold=8.0,
    phi_min_std_dev_s=0.2,
    acceptable_pause_s=1.0,
    call_retries=2,
    retry_backoff_s=0.0,
    breaker_failures=2,
    breaker_reset_s=5.0,
)


class FakeRegistry(Registry):
    def __init__(self) -> None:
        self.records: dict[str, Instance] = {}

    async def put(self, instance: Instance) -> None:
        self.records[instance.key] = instance

    async def remove(self, service: str, instance_id: str) -> None:
        self.records.pop(f"{service}.{instance_id}", None)

    async def list(self, service: str | None = None) -> builtins.list[Instance]:
        return sorted(
            (i for i in self.records.values() if service in (None, i.service)), key=lambda i: i.key
        )

    def beat(self, iid: str) -> None:
        key = f"api.{iid}"
        old = self.records.get(key) or Instance(service="api", instance_id=iid, started_ms=1)
        self.records[key] = msgspec.structs.replace(old, seq=old.seq + 1)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def world() -> tuple[FakeRegistry, Clock, Discovery]:
    registry, clock = FakeRegistry(), Clock()
    return registry, clock, Discovery(registry, "api", SETTINGS, clock=clock)


async def tick(
    world: tuple[FakeRegistry, Clock, Discovery], seconds: int, beating: list[str]
) -> None:
    """`seconds` seconds of heartbeats from `beating`, the client looking each second."""
    registry, clock, discovery = world
    for _ in range(seconds):
        clock.now += 1.0
        for iid in beating:
            registry.beat(iid)
        await discovery.refresh()


async def test_a_silent_instance_leaves_rotation_within_the_detector_bound(
    world: tuple[FakeRegistry, Clock, Discovery],
) -> None:
    _, clock, discovery = world
    await tick(world, 20, ["a", "b"])
    assert [i.instance_id for i in discovery.alive()] == ["a", "b"]
    bound = 1.0 + 1.0 + 5.62 * 0.2  # interval + pause + z(8) * min std: see discovery.py
    silent_since = clock.now
    while "b" in [i.instance_id for i in discovery.alive()]:
        await tick(world, 1, ["a"])
        assert clock.now - silent_since <= bound + 1.0  # + the look interval of this test
    # Still registered (the TTL has not run out) but out of rotation, with its phi shown.
    views = {v.instance.instance_id: v for v in discovery.members()}
    assert not views["b"].alive
    assert views["b"].state == "failed"
    assert views["b"].phi >= SETTINGS.phi_threshold
    assert views["a"].alive
    # Its next heartbeat brings it back.
    await tick(world, 1, ["a", "b"])
    assert [i.instance_id for i in discovery.alive()] == ["a", "b"]


async def test_an_unreadable_registry_freezes_the_view_instead_of_failing_everyone(
    world: tuple[FakeRegistry, Clock, Discovery],
) -> None:
    registry, clock, discovery = world
    await tick(world, 5, ["a", "b"])

    async def down(service: str | None = None) -> list[Instance]:
        raise ConnectionError("engine down")

    registry.list = down  # type: ignore[method-assign]
    clock.now += 60.0
    with pytest.raises(ConnectionError):
        await discovery.refresh()
    assert not discovery.health().ok
    assert [i.instance_id for i in discovery.alive()] == ["a", "b"]


async def test_a_record_gone_from_the_registry_is_forgotten(
    world: tuple[FakeRegistry, Clock, Discovery],
) -> None:
    registry, _, discovery = world
    await tick(world, 3, ["a", "b"])
    await registry.remove("api", "b")
    await discovery.refresh()
    assert [m.instance.instance_id for m in discovery.members()] == ["a"]


async def test_draining_instances_take_no_calls(
    world: tuple[FakeRegistry, Clock, Discovery],
) -> None:
    registry, _, discovery = world
    await tick(world, 3, ["a", "b"])
    registry.records["api.a"] = msgspec.structs.replace(
        registry.records["api.a"], health="draining"
    )
    await discovery.refresh()
    assert [i.instance_id for i in discovery.alive()] == ["b"]


async def test_a_failed_call_is_retried_on_another_instance(
    world: tuple[FakeRegistry, Clock, Discovery],
) -> None:
    _, _, discovery = world
    await tick(world, 3, ["a", "b", "c"])
    tried: list[str] = []

    async def call(instance: Instance) -> str:
        tried.append(instance.instance_id)
        if instance.instance_id != "c":
            raise ConnectionRefusedError
        return "ok"

    assert await discovery.call(call, key="device-7") == "ok"
    assert tried[-1] == "c"
    assert len(tried) == len(set(tried))  # never the same instance twice in one call


async def test_when_every_attempt_fails_the_caller_learns_which_and_why(
    world: tuple[FakeRegistry, Clock, Discovery],
) -> None:
    _, _, discovery = world
    await tick(world, 3, ["a", "b"])

    async def call(instance: Instance) -> None:
        raise ConnectionRefusedError(instance.instance_id)

    with pytest.raises(CallFailed) as caught:
        await discovery.call(call)
    assert sorted(i for i, _ in caught.value.attempts) == ["a", "b"]


async def test_non_retryable_errors_are_raised_at_once(
    world: tuple[FakeRegistry, Clock, Discovery],
) -> None:
    _, _, discovery = world
    await tick(world, 3, ["a", "b"])
    calls = 0

    async def call(instance: Instance) -> None:
        nonlocal calls
        calls += 1
        raise KeyError("the answer was 404")

    with pytest.raises(KeyError):
        await discovery.call(call, retryable=lambda e: not isinstance(e, KeyError))
    assert calls == 1


async def test_a_call_timing_out_counts_as_a_failure(
    world: tuple[FakeRegistry, Clock, Discovery],
) -> None:
    _, _, discovery = world
    await tick(world, 3, ["a", "b"])

    async def call(instance: Instance) -> str:
        if instance.instance_id == "a":
            await asyncio.sleep(10)
        return instance.instance_id

    for _ in range(3):
        assert await discovery.call(call, timeout=0.05) == "b"


async def test_the_breaker_takes_a_failing_instance_out_until_its_trial_succeeds(
    world: tuple[FakeRegistry, Clock, Discovery],
) -> None:
    _, _, discovery = world
    await tick(world, 3, ["a", "b"])
    broken = True
    seen: list[str] = []

    async def call(instance: Instance) -> str:
        seen.append(instance.instance_id)
        if instance.instance_id == "a" and broken:
            raise ConnectionResetError
        return instance.instance_id

    for _ in range(6):
        await discovery.call(call)
    assert seen.count("a") == 2  # breaker_failures = 2, then open
    assert [i.instance_id for i in discovery.alive()] == ["b"]
    seen.clear()
    await tick(world, int(SETTINGS.breaker_reset_s), ["a", "b"])  # half-open: one trial
    broken = False
    for _ in range(4):
        await discovery.call(call)
    assert "a" in seen
    assert [i.instance_id for i in discovery.alive()] == ["a", "b"]


async def test_no_instance_is_an_overload_to_retry_later(
    world: tuple[FakeRegistry, Clock, Discovery],
) -> None:
    _, _, discovery = world
    await discovery.refresh()

    async def call(instance: Instance) -> None:
        raise AssertionError("not called")

    with pytest.raises(NoInstance):
        await discovery.call(call)


async def test_least_outstanding_counts_calls_in_flight(
    world: tuple[FakeRegistry, Clock, Discovery],
) -> None:

    registry, clock = world[0], world[1]
    discovery = Discovery(registry, "api", SETTINGS, policy="least_outstanding", clock=clock)
    await tick((registry, clock, discovery), 3, ["a", "b"])
    release = asyncio.Event()
    where: list[str] = []

    async def slow(instance: Instance) -> None:
        where.append(instance.instance_id)
        await release.wait()

    tasks = [asyncio.create_task(discovery.call(slow, timeout=10)) for _ in range(4)]
    await asyncio.sleep(0.05)
    release.set()
    await asyncio.gather(*tasks)
    assert sorted(where) == ["a", "a", "b", "b"]
