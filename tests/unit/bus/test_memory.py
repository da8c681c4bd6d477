"""MemoryBus: partitions, consumer groups, settlement, back-pressure and draining."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import zlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iotmesh.bus import subjects
from iotmesh.bus.interface import BusError, DeadLettered, Delivery
from iotmesh.bus.memory import MemoryBus
from iotmesh.core.errors import Overloaded
from iotmesh.core.settings import BusSettings


@contextlib.asynccontextmanager
async def running_bus(**settings: Any) -> AsyncIterator[MemoryBus]:
    """A started bus with small settings, stopped (drained) on the way out."""
    bus = MemoryBus(BusSettings(**settings))
    await bus.start()
    try:
        yield bus
    finally:
        await bus.stop()


async def eventually(predicate: Callable[[], bool], within: float = 2.0) -> None:
    """Let the event loop run until `predicate` holds; a hang fails fast instead of at 120 s."""
    async with asyncio.timeout(within):
        # Polling: the code under test exposes no event for these states (queue depths).
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.001)


def publish(bus: MemoryBus, msg_id: str, key: str = "dev-1", **kw: Any) -> asyncio.Task[None]:
    """Publish in a task, so the test can look at the bus while the publisher waits."""
    return asyncio.create_task(
        bus.publish(f"telemetry.{key}", msg_id.encode(), key=key, msg_id=msg_id, **kw),
        name=f"publish-{msg_id}",
    )


async def test_per_key_order_holds_across_partitions_and_concurrent_publishers() -> None:
    keys = [f"dev-{i}" for i in range(8)]
    per_key = 15
    acked: dict[str, list[int]] = {key: [] for key in keys}
    attempts = 0

    async def handler(deliveries: Sequence[Delivery]) -> None:
        nonlocal attempts
        attempts += 1
        await asyncio.sleep(0)  # let publishers interleave with consumers
        # Fail every third batch once, as a store error would: the whole batch is nacked.
        if attempts % 3 == 0 and deliveries[0].attempt == 1:
            for d in deliveries:
                d.nack()
            return
        for d in deliveries:
            key, seq = d.data.decode().split("/")
            acked[key].append(int(seq))
            d.ack()

    async with running_bus(partitions=4, partition_queue=256, max_batch=4) as bus:
        await bus.subscribe("telemetry.>", "pipeline", handler)
        # Tasks start in creation order and each enqueues without waiting (the queues
        # have room), so per key the messages are handed to the bus in `seq` order,
        # interleaved with every other key's.
        tasks = [
            asyncio.create_task(
                bus.publish(
                    f"telemetry.{key}", f"{key}/{seq}".encode(), key=key, msg_id=f"{key}/{seq}"
                )
            )
            for seq in range(per_key)
            for key in keys
        ]
        await asyncio.gather(*tasks)

    assert len({subjects.partition_of(key, 4) for key in keys}) > 1
    assert acked == {key: list(range(per_key)) for key in keys}
    assert attempts > 3  # some batches really were nacked and retried


async def test_every_group_gets_every_message_and_publish_waits_for_all() -> None:
    fast_seen: list[str] = []
    slow_seen: list[str] = []
    slow_gate = asyncio.Event()

    async def fast(deliveries: Sequence[Delivery]) -> None:
        for d in deliveries:
            fast_seen.append(d.msg_id)
            d.ack()

    async def slow(deliveries: Sequence[Delivery]) -> None:
        await slow_gate.wait()
        for d in deliveries:
            slow_seen.append(d.msg_id)
            d.ack()

    async with running_bus(partitions=2, partition_queue=8, max_batch=2) as bus:
        await bus.subscribe("telemetry.>", "store", fast)
        await bus.subscribe("telemetry.*", "rules", slow)
        tasks = [publish(bus, f"m{i}", key=f"dev-{i % 3}") for i in range(5)]
        await eventually(lambda: len(fast_seen) == 5)
        assert not any(t.done() for t in tasks), "publish returned before every group acked"
        slow_gate.set()
        await asyncio.gather(*tasks)

    expected = [f"m{i}" for i in range(5)]
    assert sorted(fast_seen) == expected
    assert sorted(slow_seen) == expected


async def test_nacked_message_is_retried_before_later_messages_of_its_partition() -> None:
    seen: list[tuple[str, int]] = []

    async def handler(deliveries: Sequence[Delivery]) -> None:
        for d in deliveries:
            seen.append((d.msg_id, d.attempt))
            if d.msg_id == "a" and d.attempt == 1:
                d.nack()
            else:
                d.ack()

    async with running_bus(partitions=1, partition_queue=8, max_batch=1) as bus:
        await bus.subscribe("telemetry.>", "pipeline", handler)
        # Different keys, one partition: the retry still goes first.
        await asyncio.gather(*(publish(bus, m, key=f"dev-{m}") for m in ("a", "b", "c")))

    assert seen == [("a", 1), ("a", 2), ("b", 1), ("c", 1)]


async def test_nacked_batch_is_retried_before_messages_queued_behind_it() -> None:
    batches: list[tuple[list[str], int]] = []
    in_handler = asyncio.Event()
    gate = asyncio.Event()

    async def handler(deliveries: Sequence[Delivery]) -> None:
        batches.append(([d.msg_id for d in deliveries], deliveries[0].attempt))
        in_handler.set()
        await gate.wait()
        for d in deliveries:
            if d.attempt == 1 and d.msg_id != "d":
                d.nack()
            else:
                d.ack()

    async with running_bus(partitions=1, partition_queue=8, max_batch=4) as bus:
        await bus.subscribe("telemetry.>", "pipeline", handler)
        first = [publish(bus, m) for m in ("a", "b", "c")]
        await in_handler.wait()
        later = publish(bus, "d")
        await eventually(lambda: bus.depth() == 1)
        gate.set()
        await asyncio.gather(*first, later)

    assert batches == [(["a", "b", "c"], 1), (["a", "b", "c"], 2), (["d"], 1)]


async def test_message_is_dead_lettered_after_max_deliver_attempts() -> None:
    attempts: list[int] = []

    async def always_nack(deliveries: Sequence[Delivery]) -> None:
        for d in deliveries:
            attempts.append(d.attempt)
            d.nack()

    async with running_bus(partitions=1, partition_queue=4, max_deliver=3) as bus:
        await bus.subscribe("telemetry.>", "pipeline", always_nack)
        with pytest.raises(DeadLettered, match="3 times"):
            await bus.publish("telemetry.dev-1", b"x", key="dev-1", msg_id="m1")

    assert attempts == [1, 2, 3]


async def test_term_dead_letters_at_once() -> None:
    attempts: list[int] = []

    async def terminate(deliveries: Sequence[Delivery]) -> None:
        for d in deliveries:
            attempts.append(d.attempt)
            d.term("cannot decode")

    async with running_bus(partitions=1, partition_queue=4, max_deliver=5) as bus:
        await bus.subscribe("telemetry.>", "pipeline", terminate)
        with pytest.raises(DeadLettered, match="cannot decode"):
            await bus.publish("telemetry.dev-1", b"x", key="dev-1", msg_id="m1")

    assert attempts == [1]


async def test_handler_that_raises_gets_the_batch_again(caplog: pytest.LogCaptureFixture) -> None:
    attempts: list[int] = []

    async def flaky(deliveries: Sequence[Delivery]) -> None:
        attempts.append(deliveries[0].attempt)
        if deliveries[0].attempt == 1:
            raise RuntimeError("boom")
        for d in deliveries:
            d.ack()

    with caplog.at_level(logging.ERROR, logger="iotmesh.bus.memory"):
        async with running_bus(partitions=1, partition_queue=4) as bus:
            await bus.subscribe("telemetry.>", "pipeline", flaky)
            await bus.publish("telemetry.dev-1", b"x", key="dev-1", msg_id="m1")

    assert attempts == [1, 2]
    assert any("handler failed" in r.getMessage() for r in caplog.records)


async def test_unsettled_delivery_is_redelivered() -> None:
    attempts: list[int] = []

    async def forgetful(deliveries: Sequence[Delivery]) -> None:
        for d in deliveries:
            attempts.append(d.attempt)
            if d.attempt > 1:
                d.ack()
        # attempt 1: returns without settling anything

    async with running_bus(partitions=1, partition_queue=4) as bus:
        await bus.subscribe("telemetry.>", "pipeline", forgetful)
        await bus.publish("telemetry.dev-1", b"x", key="dev-1", msg_id="m1")

    assert attempts == [1, 2]


async def test_publish_without_matching_group_raises_bus_error() -> None:
    async def ack_all(deliveries: Sequence[Delivery]) -> None:
        for d in deliveries:
            d.ack()

    async with running_bus(partitions=1, partition_queue=4) as bus:
        await bus.subscribe("telemetry.*", "pipeline", ack_all)
        with pytest.raises(BusError, match="no consumer group") as info:
            await bus.publish("attributes.dev-1", b"x", key="dev-1", msg_id="m1")
        assert type(info.value) is BusError
        with pytest.raises(BusError, match="no consumer group"):
            await bus.publish("telemetry.dev-1.extra", b"x", key="dev-1", msg_id="m2")


async def test_closed_subscription_no_longer_takes_its_subject() -> None:
    async def ack_all(deliveries: Sequence[Delivery]) -> None:
        for d in deliveries:
            d.ack()

    async with running_bus(partitions=1, partition_queue=4) as bus:
        async with await bus.subscribe("telemetry.>", "pipeline", ack_all):
            await bus.publish("telemetry.dev-1", b"x", key="dev-1", msg_id="m1")
        with pytest.raises(BusError, match="no consumer group"):
            await bus.publish("telemetry.dev-1", b"x", key="dev-1", msg_id="m2")


async def test_second_consumer_of_a_group_is_refused() -> None:
    async def ack_all(deliveries: Sequence[Delivery]) -> None:
        for d in deliveries:
            d.ack()

    async with running_bus(partitions=1, partition_queue=4) as bus:
        await bus.subscribe("telemetry.>", "pipeline", ack_all)
        with pytest.raises(BusError, match="already consumes"):
            await bus.subscribe("telemetry.>", "pipeline", ack_all)


async def test_publish_on_stopped_bus_raises_bus_error() -> None:
    bus = MemoryBus(BusSettings(partitions=1, partition_queue=4))
    with pytest.raises(BusError, match="stopped"):
        await bus.publish("telemetry.dev-1", b"x", key="dev-1", msg_id="m1")
    await bus.start()
    await bus.stop()
    with pytest.raises(BusError, match="stopped"):
        await bus.publish("telemetry.dev-1", b"x", key="dev-1", msg_id="m1")


async def test_full_partition_makes_publish_raise_overloaded() -> None:
    in_handler = asyncio.Event()
    gate = asyncio.Event()
    handled: list[str] = []

    async def blocked(deliveries: Sequence[Delivery]) -> None:
        in_handler.set()
        await gate.wait()
        for d in deliveries:
            handled.append(d.msg_id)
            d.ack()

    async with running_bus(partitions=1, partition_queue=1, max_batch=1) as bus:
        await bus.subscribe("telemetry.>", "pipeline", blocked)
        first = publish(bus, "m1")  # taken by the consumer, which blocks
        await in_handler.wait()
        second = publish(bus, "m2")  # fills the one-slot queue
        await eventually(lambda: bus.depth() == 1)

        with pytest.raises(Overloaded) as info:
            await bus.publish("telemetry.dev-1", b"m3", key="dev-1", msg_id="m3", timeout=0.05)
        assert info.value.retry_after > 0
        assert bus.depth() == 1

        gate.set()
        await asyncio.gather(first, second)

    assert handled == ["m1", "m2"]


async def test_publish_nowait_calls_back_when_acked_and_declines_when_full() -> None:
    gate = asyncio.Event()
    handled: list[str] = []
    outcomes: dict[str, BaseException | None] = {}

    def on_done(msg_id: str) -> Callable[[BaseException | None], None]:
        return lambda error: outcomes.__setitem__(msg_id, error)

    async def blocked(deliveries: Sequence[Delivery]) -> None:
        await gate.wait()
        for d in deliveries:
            handled.append(d.msg_id)
            d.ack()

    async with running_bus(partitions=1, partition_queue=1, max_batch=1) as bus:
        took = bus.publish_nowait("telemetry.dev-1", b"x", key="dev-1", msg_id="x", on_done=print)
        assert not took  # no consumer group yet: `publish` is what raises
        await bus.subscribe("telemetry.>", "pipeline", blocked)
        assert bus.publish_nowait(
            "telemetry.dev-1", b"m1", key="dev-1", msg_id="m1", on_done=on_done("m1")
        )
        await eventually(lambda: bus.depth() == 0)  # the consumer took it and blocks
        assert bus.publish_nowait(
            "telemetry.dev-1", b"m2", key="dev-1", msg_id="m2", on_done=on_done("m2")
        )
        # The one-slot queue is full: no fast path; `publish` is the way to wait for room.
        assert not bus.publish_nowait(
            "telemetry.dev-1", b"m3", key="dev-1", msg_id="m3", on_done=on_done("m3")
        )
        assert outcomes == {}
        gate.set()
        await eventually(lambda: len(outcomes) == 2)

    assert handled == ["m1", "m2"]
    assert outcomes == {"m1": None, "m2": None}


async def test_publish_nowait_reports_a_dead_lettered_message() -> None:
    async def refuse(deliveries: Sequence[Delivery]) -> None:
        for d in deliveries:
            d.term("no")

    outcomes: list[BaseException | None] = []
    async with running_bus() as bus:
        await bus.subscribe("telemetry.>", "pipeline", refuse)
        assert bus.publish_nowait(
            "telemetry.dev-1", b"m1", key="dev-1", msg_id="m1", on_done=outcomes.append
        )
        await eventually(lambda: bool(outcomes))
    assert isinstance(outcomes[0], DeadLettered)


async def ack_all(deliveries: Sequence[Delivery]) -> None:
    for d in deliveries:
        d.ack()


async def test_a_failing_completion_callback_does_not_stop_the_consumer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(error: BaseException | None) -> None:
        raise RuntimeError("bug in the publisher")

    async with running_bus() as bus:
        await bus.subscribe("telemetry.>", "pipeline", ack_all)
        took = bus.publish_nowait("telemetry.d", b"m1", key="d", msg_id="m1", on_done=broken)
        assert took
        await publish(bus, "m2")  # the consumer goes on
    assert "completion callback failed" in caplog.text


async def test_overloaded_publish_reaches_no_group() -> None:
    in_slow = asyncio.Event()
    gate = asyncio.Event()
    fast_seen: list[str] = []

    async def fast(deliveries: Sequence[Delivery]) -> None:
        for d in deliveries:
            fast_seen.append(d.msg_id)
            d.ack()

    async def slow(deliveries: Sequence[Delivery]) -> None:
        in_slow.set()
        await gate.wait()
        for d in deliveries:
            d.ack()

    async with running_bus(partitions=1, partition_queue=1, max_batch=1) as bus:
        # Subscription order is publish order: "fast" gets the message first.
        await bus.subscribe("telemetry.>", "fast", fast)
        await bus.subscribe("telemetry.>", "slow", slow)
        first = publish(bus, "m1")
        await in_slow.wait()
        second = publish(bus, "m2")
        await eventually(lambda: "m2" in fast_seen and bus.depth() == 1)

        with pytest.raises(Overloaded):
            await bus.publish("telemetry.dev-1", b"m3", key="dev-1", msg_id="m3", timeout=0.05)

        gate.set()
        await asyncio.gather(first, second)
        await eventually(lambda: bus.depth() == 0)

    assert "m3" not in fast_seen


async def test_stop_drains_queued_messages_before_returning() -> None:
    in_handler = asyncio.Event()
    gate = asyncio.Event()
    handled: list[str] = []

    async def blocked(deliveries: Sequence[Delivery]) -> None:
        in_handler.set()
        await gate.wait()
        for d in deliveries:
            handled.append(d.msg_id)
            d.ack()

    bus = MemoryBus(BusSettings(partitions=2, partition_queue=8, max_batch=2))
    await bus.start()
    await bus.subscribe("telemetry.>", "pipeline", blocked)
    tasks = [publish(bus, f"m{i}", key=f"dev-{i}") for i in range(6)]
    await in_handler.wait()
    await eventually(lambda: bus.depth() > 0)

    stopping = asyncio.create_task(bus.stop(), name="bus-stop")
    await asyncio.sleep(0.01)
    assert not stopping.done(), "stop returned with messages still queued"
    gate.set()
    await stopping

    assert all(t.done() for t in tasks)
    await asyncio.gather(*tasks)  # every publisher completed without error
    assert sorted(handled) == [f"m{i}" for i in range(6)]
    assert bus.depth() == 0


async def test_stop_drains_publishers_still_waiting_for_room() -> None:
    in_handler = asyncio.Event()
    gate = asyncio.Event()
    handled: list[str] = []

    async def blocked(deliveries: Sequence[Delivery]) -> None:
        in_handler.set()
        await gate.wait()
        for d in deliveries:
            handled.append(d.msg_id)
            d.ack()

    bus = MemoryBus(BusSettings(partitions=1, partition_queue=1, max_batch=1))
    await bus.start()
    await bus.subscribe("telemetry.>", "pipeline", blocked)
    first = publish(bus, "m1")
    await in_handler.wait()
    waiting = [publish(bus, f"m{i}") for i in (2, 3, 4)]  # m3, m4 wait for room
    await eventually(lambda: bus.depth() == 1)

    stopping = asyncio.create_task(bus.stop(), name="bus-stop")
    await asyncio.sleep(0)
    gate.set()
    async with asyncio.timeout(2):
        await stopping
        await asyncio.gather(first, *waiting)

    assert handled == ["m1", "m2", "m3", "m4"]


@pytest.mark.parametrize(
    ("pattern", "subject", "expected"),
    [
        ("telemetry.dev-1", "telemetry.dev-1", True),
        ("telemetry.dev-1", "telemetry.dev-2", False),
        ("telemetry.dev-1", "telemetry.dev-1.x", False),
        ("telemetry.*", "telemetry.dev-1", True),
        ("telemetry.*", "telemetry", False),
        ("telemetry.*", "telemetry.dev-1.x", False),
        ("telemetry.*", "attributes.dev-1", False),
        ("*", "telemetry", True),
        ("*", "telemetry.dev-1", False),
        ("*.dev-1", "telemetry.dev-1", True),
        ("a.*.c", "a.b.c", True),
        ("a.*.c", "a.b.d", False),
        ("telemetry.>", "telemetry.dev-1", True),
        ("telemetry.>", "telemetry.dev-1.x.y", True),
        ("telemetry.>", "telemetry", False),
        ("telemetry.>", "attributes.dev-1", False),
        (">", "telemetry", True),
        (">", "telemetry.dev-1", True),
        ("*.>", "telemetry", False),
        ("*.>", "telemetry.dev-1", True),
    ],
)
def test_matches(pattern: str, subject: str, *, expected: bool) -> None:
    assert subjects.matches(pattern, subject) is expected


def test_telemetry_subject_is_matched_by_the_pipeline_pattern() -> None:
    subject = subjects.telemetry_subject("dev-1")
    assert subject == "telemetry.dev-1"
    assert subjects.matches(f"{subjects.TELEMETRY}.>", subject)


def test_partition_of_is_pinned() -> None:
    # Durable engines keep partitions across restarts: changing the hash moves devices.
    assert [subjects.partition_of(k, 8) for k in ("device-1", "a", "", "ünïcode")] == [1, 3, 0, 2]
    assert subjects.partition_of("device-1", 1024) == zlib.crc32(b"device-1") % 1024 == 633


def test_partition_of_spreads_keys() -> None:
    used = {subjects.partition_of(f"dev-{i}", 8) for i in range(200)}
    assert used == set(range(8))


@given(key=st.text(max_size=64), partitions=st.integers(1, 1024))
def test_partition_of_is_stable_and_in_range(key: str, partitions: int) -> None:
    partition = subjects.partition_of(key, partitions)
    assert 0 <= partition < partitions
    assert subjects.partition_of(key, partitions) == partition


async def test_routes_follow_groups_that_come_and_go_after_a_subject_was_published() -> None:
    """The (subject, key) route cache is dropped when a group subscribes or closes."""
    got: dict[str, list[bytes]] = {"a": [], "b": []}

    def recorder(name: str) -> Any:
        async def handler(deliveries: Sequence[Delivery]) -> None:
            for d in deliveries:
                got[name].append(d.data)
                d.ack()

        return handler

    async with running_bus(partitions=2) as bus:
        first = await bus.subscribe("telemetry.>", "a", recorder("a"))
        await publish(bus, "m1")
        second = await bus.subscribe("telemetry.*", "b", recorder("b"))
        await publish(bus, "m2")  # the cached route of telemetry.dev-1 must now reach b
        await first.close()
        await publish(bus, "m3")  # and no longer a closed group
        await second.close()
        with pytest.raises(BusError):
            await publish(bus, "m4")
    assert got == {"a": [b"m1", b"m2"], "b": [b"m2", b"m3"]}
