"""The contract of the bus: every implementation must pass this whole suite.

The rules are those of the docstring of `iotmesh.bus.interface`, run against the
in-process bus and against real engines on loopback (nats-server with JetStream,
redis-server). Where implementations differ by design, the test says what is common
and then checks each side of the difference explicitly:

- `publish` returns when delivery is guaranteed: the in-process bus (which stores
  nothing) once every group acked, an engine once it stored the message.
- a group has one member in the in-process bus; engines take several (competing
  consumers), and a member that dies leaves its messages to the others.
- dead letters: the in-process publisher gets `DeadLettered`; an engine keeps a copy
  on `deadletter.<group>.<subject>`.
- duplicate message ids: engines drop the second publish; the in-process bus, whose
  publisher waits for the outcome and so never re-publishes blindly, does not.
- `publish_nowait`: only the in-process bus has the fast path.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from iotmesh.bus import subjects
from iotmesh.bus.durable import Engine, EngineMessage, group_id
from iotmesh.bus.interface import Bus, BusError, DeadLettered, Delivery
from iotmesh.core.errors import Overloaded
from iotmesh.core.settings import WriterSettings
from iotmesh.core.types import TsRecord
from iotmesh.pipeline.ingest import TelemetryIngest
from iotmesh.pipeline.latest import LatestValues
from iotmesh.pipeline.service import Pipeline
from iotmesh.storage.writer import BatchWriter
from tests.contract.bus_backends import BACKENDS, Backend, BusHarness
from tests.unit.doubles import RecordingStore

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=BACKENDS, ids=lambda b: b.name)
def bus_backend(request: pytest.FixtureRequest) -> Backend:
    """The backend under test."""
    b: Backend = request.param
    return b


@pytest.fixture
async def make_harness(
    bus_backend: Backend,
) -> AsyncIterator[Callable[..., BusHarness]]:
    """Build the harness with settings for this test; closed (data deleted) after it."""
    made: list[BusHarness] = []

    def make(**overrides: Any) -> BusHarness:
        harness = BusHarness(bus_backend, **overrides)
        made.append(harness)
        return harness

    yield make
    for harness in made:
        await harness.close()


async def eventually(predicate: Callable[[], bool], within: float = 15.0) -> None:
    """Let the loop run until `predicate` holds; a hang fails within `within` s."""
    async with asyncio.timeout(within):
        # Polling: consumers in other connections expose no event to wait on.
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


def publish_task(bus: Bus, msg_id: str, key: str = "dev-1", **kw: Any) -> asyncio.Task[None]:
    """Publish in a task: the in-process publish waits for the consumers."""
    data = kw.pop("data", msg_id.encode())
    return asyncio.create_task(
        bus.publish(f"telemetry.{key}", data, key=key, msg_id=msg_id, **kw),
        name=f"publish-{msg_id}",
    )


async def publish(bus: Bus, msg_id: str, key: str = "dev-1", **kw: Any) -> None:
    await publish_task(bus, msg_id, key, **kw)


async def publish_in_order(h: BusHarness, bus: Bus, messages: list[tuple[str, str]]) -> None:
    """Publish (msg id, key) pairs so that the bus gets them in this order."""
    if h.durable:
        for msg_id, key in messages:
            await publish(bus, msg_id, key)
    else:  # each task enqueues at its first step, in creation order, then waits
        await asyncio.gather(*(publish_task(bus, msg_id, key) for msg_id, key in messages))


def keys_on_partitions(partitions: int, per_partition: int) -> list[str]:
    """Keys, `per_partition` of them on each partition."""
    keys: list[str] = []
    for p in range(partitions):
        found = (
            f"dev-{i}" for i in range(10_000) if subjects.partition_of(f"dev-{i}", partitions) == p
        )
        keys.extend(next(found) for _ in range(per_partition))
    return keys


class Recorder:
    """A handler that records and acks (or settles as `decide` says)."""

    def __init__(self, decide: Callable[[Delivery], None] | None = None) -> None:
        self.seen: list[tuple[str, int]] = []
        self.acked: list[Delivery] = []
        self._decide = decide

    async def __call__(self, deliveries: Sequence[Delivery]) -> None:
        for d in deliveries:
            self.seen.append((d.msg_id, d.attempt))
            if self._decide is not None:
                self._decide(d)
            else:
                d.ack()
            if d.settled and getattr(d, "state", "ack") == "ack":
                self.acked.append(d)

    @property
    def acked_ids(self) -> list[str]:
        return [d.msg_id for d in self.acked]


# -- delivery -----------------------------------------------------------------------


async def test_published_messages_reach_the_consumer(
    make_harness: Callable[..., BusHarness],
) -> None:
    h = make_harness()
    bus = await h.bus()
    rec = Recorder()
    await bus.subscribe("telemetry.>", "pipeline", rec)
    for i, key in enumerate(["dev-a", "dev-b", "dev-a"]):
        await publish(bus, f"m{i}", key, data=f"payload {i}".encode())
    await eventually(lambda: len(rec.acked) == 3)

    got = sorted((d.msg_id, d.subject, d.key, d.data, d.attempt) for d in rec.acked)
    assert got == [
        ("m0", "telemetry.dev-a", "dev-a", b"payload 0", 1),
        ("m1", "telemetry.dev-b", "dev-b", b"payload 1", 1),
        ("m2", "telemetry.dev-a", "dev-a", b"payload 2", 1),
    ]


async def test_every_group_gets_every_message(make_harness: Callable[..., BusHarness]) -> None:
    h = make_harness()
    bus = await h.bus()
    store, rules = Recorder(), Recorder()
    await bus.subscribe("telemetry.>", "store", store)
    await bus.subscribe("telemetry.*", "rules", rules)
    await asyncio.gather(*(publish_task(bus, f"m{i}", f"dev-{i % 3}") for i in range(6)))
    await eventually(lambda: len(store.acked) == 6 and len(rules.acked) == 6)

    expected = [f"m{i}" for i in range(6)]
    assert sorted(store.acked_ids) == expected
    assert sorted(rules.acked_ids) == expected


async def test_a_group_gets_only_the_subjects_of_its_pattern(
    make_harness: Callable[..., BusHarness],
) -> None:
    h = make_harness()
    bus = await h.bus()
    one, deep = Recorder(), Recorder()
    await bus.subscribe("telemetry.*", "one-token", one)
    await bus.subscribe("telemetry.>", "all", deep)
    await bus.publish("telemetry.dev-1.sub", b"x", key="dev-1", msg_id="deep")
    await bus.publish("telemetry.dev-1", b"x", key="dev-1", msg_id="flat")
    await eventually(lambda: len(deep.acked) == 2 and len(one.acked) == 1)
    assert one.acked_ids == ["flat"]


async def test_publish_returns_once_delivery_is_guaranteed(
    make_harness: Callable[..., BusHarness],
) -> None:
    h = make_harness()
    bus = await h.bus()
    gate = asyncio.Event()

    async def blocked(deliveries: Sequence[Delivery]) -> None:
        await gate.wait()
        for d in deliveries:
            d.ack()

    await bus.subscribe("telemetry.>", "pipeline", blocked)
    task = publish_task(bus, "m1")
    if h.durable:
        await task  # stored: done, while the consumer still holds it
    else:
        await asyncio.sleep(0.05)
        assert not task.done(), "the in-process publish returned before the group acked"
    gate.set()
    await task


# -- groups and order ---------------------------------------------------------------


async def test_members_of_a_group_share_its_messages(
    make_harness: Callable[..., BusHarness],
) -> None:
    h = make_harness()
    first_bus = await h.bus()
    first, second = Recorder(), Recorder()
    await first_bus.subscribe("telemetry.>", "pipeline", first)
    if not h.durable:
        with pytest.raises(BusError, match="already consumes"):
            await first_bus.subscribe("telemetry.>", "pipeline", second)
        return
    second_bus = await h.bus()
    await second_bus.subscribe("telemetry.>", "pipeline", second)

    keys = keys_on_partitions(h.settings.partitions, 2)
    published: list[str] = []
    async with asyncio.timeout(20):
        # Until the members have split the partitions (a few lease rounds), and then
        # some, bounded in count: 50 rounds of 8 messages.
        for round_ in range(50):
            for key in keys:
                published.append(f"{key}/{round_}")
                await publish(first_bus, published[-1], key)
            if first.acked and second.acked and round_ >= 3:
                break
            await asyncio.sleep(0.1)
    await eventually(lambda: len(first.acked) + len(second.acked) >= len(published))

    assert first.acked, "the second member got everything"
    assert second.acked, "the first member got everything"
    assert sorted({*first.acked_ids, *second.acked_ids}) == sorted(published)


async def test_per_key_order_holds_with_several_members_and_retries(
    make_harness: Callable[..., BusHarness],
) -> None:
    h = make_harness()
    members = 2 if h.durable else 1
    acked: dict[str, list[int]] = {}
    batches = 0

    async def handler(deliveries: Sequence[Delivery]) -> None:
        nonlocal batches
        batches += 1
        await asyncio.sleep(0)
        if batches % 3 == 0 and deliveries[0].attempt == 1:
            for d in deliveries:  # as the pipeline does when a commit fails
                d.nack()
            return
        for d in deliveries:
            key, seq = d.data.decode().split("/")
            acked.setdefault(key, []).append(int(seq))
            d.ack()

    buses = [await h.bus() for _ in range(members)]
    for bus in buses:
        await bus.subscribe("telemetry.>", "pipeline", handler)
    keys = [f"dev-{i}" for i in range(8)]
    per_key = 15
    for seq in range(per_key):
        await asyncio.gather(
            *(
                publish_task(buses[0], f"{key}/{seq}", key, data=f"{key}/{seq}".encode())
                for key in keys
            )
        )
    await eventually(lambda: all(len(set(acked.get(k, []))) == per_key for k in keys))

    for key in keys:
        got = acked[key]
        assert got == sorted(got), f"{key} out of order: {got}"  # redelivery repeats, in order
        assert sorted(set(got)) == list(range(per_key))
    assert batches > 3


async def test_nacked_message_comes_back_before_later_ones_of_its_partition(
    make_harness: Callable[..., BusHarness],
) -> None:
    h = make_harness(partitions=1, max_batch=1)
    bus = await h.bus()

    def decide(d: Delivery) -> None:
        if d.msg_id == "a" and d.attempt == 1:
            d.nack(delay=0.2)
        else:
            d.ack()

    rec = Recorder(decide)
    await bus.subscribe("telemetry.>", "pipeline", rec)
    await publish_in_order(h, bus, [(m, f"dev-{m}") for m in ("a", "b", "c")])
    await eventually(lambda: len(rec.acked) == 3)
    assert rec.seen == [("a", 1), ("a", 2), ("b", 1), ("c", 1)]


async def test_a_raising_or_forgetful_handler_gets_the_message_again(
    make_harness: Callable[..., BusHarness],
    caplog: pytest.LogCaptureFixture,
) -> None:
    h = make_harness(max_deliver=5)
    bus = await h.bus()
    attempts: list[int] = []

    async def flaky(deliveries: Sequence[Delivery]) -> None:
        attempts.extend(d.attempt for d in deliveries)
        if deliveries[0].attempt == 1:
            raise RuntimeError("boom")
        if deliveries[0].attempt == 2:
            return  # settles nothing
        for d in deliveries:
            d.ack()

    await bus.subscribe("telemetry.>", "pipeline", flaky)
    await publish(bus, "m1")
    await eventually(lambda: attempts == [1, 2, 3])
    assert "handler failed" in caplog.text


# -- giving up ----------------------------------------------------------------------


@pytest.mark.parametrize("how", ["nack", "term"])
async def test_a_message_is_dead_lettered_after_max_deliver_or_term(
    make_harness: Callable[..., BusHarness], how: str
) -> None:
    h = make_harness(max_deliver=3)
    bus = await h.bus()
    attempts: dict[str, list[int]] = {}

    async def refuse_m1(deliveries: Sequence[Delivery]) -> None:
        for d in deliveries:
            attempts.setdefault(d.msg_id, []).append(d.attempt)
            if d.msg_id != "m1":
                d.ack()
            elif how == "term":
                d.term("cannot decode")
            else:
                d.nack()

    await bus.subscribe("telemetry.>", "pipeline", refuse_m1)
    expected = [1] if how == "term" else [1, 2, 3]
    reason = "cannot decode" if how == "term" else "3 times"
    if not h.durable:
        with pytest.raises(DeadLettered, match=reason):
            await publish(bus, "m1")
    else:
        letters = Recorder()
        await bus.subscribe(f"{h.settings.dead_letter_subject}.>", "inspect", letters)
        await publish(bus, "m1", data=b"poison")
        await eventually(lambda: len(letters.acked) == 1)
        letter = letters.acked[0]
        assert letter.subject == "deadletter.pipeline.telemetry.dev-1"
        assert (letter.msg_id, letter.key, letter.data) == ("m1", "dev-1", b"poison")
    # A later message of the key is delivered, and m1 never again.
    await publish(bus, "m2")
    await eventually(lambda: "m2" in attempts)
    assert attempts["m1"] == expected


# -- limits ---------------------------------------------------------------------------


async def test_in_flight_messages_are_bounded(make_harness: Callable[..., BusHarness]) -> None:
    h = make_harness(partitions=2, max_batch=2)
    bus = await h.bus()
    gate = asyncio.Event()
    in_flight = 0
    done: list[str] = []

    async def blocked(deliveries: Sequence[Delivery]) -> None:
        nonlocal in_flight
        in_flight += len(deliveries)
        await gate.wait()
        in_flight -= len(deliveries)
        for d in deliveries:
            done.append(d.msg_id)
            d.ack()

    await bus.subscribe("telemetry.>", "pipeline", blocked)
    keys = keys_on_partitions(2, 6)
    tasks = [publish_task(bus, f"m-{key}", key) for key in keys]
    limit = h.settings.partitions * 2  # partitions x max_batch
    await eventually(lambda: in_flight == limit)
    await asyncio.sleep(0.3)  # room for a bus that would hand out more
    assert in_flight == limit
    gate.set()
    await asyncio.gather(*tasks)
    await eventually(lambda: len(done) == len(keys))
    assert sorted(done) == sorted(f"m-{key}" for key in keys)


async def test_a_full_bus_pushes_back_and_keeps_nothing_it_refused(
    make_harness: Callable[..., BusHarness],
) -> None:
    h = make_harness(partitions=1, partition_queue=2, max_batch=1)
    bus = await h.bus()
    gate = asyncio.Event()
    rec = Recorder()

    async def blocked(deliveries: Sequence[Delivery]) -> None:
        await gate.wait()
        await rec(deliveries)

    await bus.subscribe("telemetry.>", "pipeline", blocked)
    tasks: list[asyncio.Task[None]] = []
    for i in range(10):
        task = publish_task(bus, f"m{i}", timeout=0.2)
        tasks.append(task)
        finished, _ = await asyncio.wait({task}, timeout=1.0)
        if finished and isinstance(task.exception(), Overloaded):
            break
    gate.set()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    refused = [f"m{i}" for i, o in enumerate(outcomes) if isinstance(o, Overloaded)]
    taken = [f"m{i}" for i, o in enumerate(outcomes) if o is None]
    assert refused, "the bus never pushed back"
    assert len(refused) + len(taken) == len(tasks)
    await publish(bus, "last")
    await eventually(lambda: "last" in rec.acked_ids)
    assert rec.acked_ids == [*taken, "last"]


async def test_acked_messages_make_room_again(make_harness: Callable[..., BusHarness]) -> None:
    h = make_harness(partitions=1, partition_queue=2, max_batch=1)
    bus = await h.bus()
    rec = Recorder()
    await bus.subscribe("telemetry.>", "pipeline", rec)
    # Ten times what the partition holds, one at a time: acked messages leave the
    # engine (NATS interest retention, Redis trimming), so none is refused.
    for i in range(20):
        await publish(bus, f"m{i}", timeout=10)
        await eventually(lambda n=i + 1: len(rec.acked) == n)
    assert rec.acked_ids == [f"m{i}" for i in range(20)]


# -- publishing -----------------------------------------------------------------------


async def test_a_duplicate_message_id_is_dropped_by_engines(
    make_harness: Callable[..., BusHarness],
) -> None:
    h = make_harness()
    bus = await h.bus()
    rec = Recorder()
    await bus.subscribe("telemetry.>", "pipeline", rec)
    await publish(bus, "m1", data=b"first")
    await publish(bus, "m1", data=b"again")
    await publish(bus, "m2")  # same key, so it comes after any copy of m1
    await eventually(lambda: "m2" in rec.acked_ids)

    got = [(d.msg_id, d.data) for d in rec.acked]
    if h.durable:
        assert got == [("m1", b"first"), ("m2", b"m2")]
    else:
        assert got == [("m1", b"first"), ("m1", b"again"), ("m2", b"m2")]


async def test_publish_nowait_takes_the_message_or_nothing(
    make_harness: Callable[..., BusHarness],
) -> None:
    h = make_harness()
    bus = await h.bus()
    rec = Recorder()
    await bus.subscribe("telemetry.>", "pipeline", rec)
    outcomes: list[BaseException | None] = []
    took = bus.publish_nowait(
        "telemetry.dev-1", b"x", key="dev-1", msg_id="fast", on_done=outcomes.append
    )
    await publish(bus, "after")
    await eventually(lambda: "after" in rec.acked_ids)
    if took:
        await eventually(lambda: outcomes == [None])
        assert rec.acked_ids == ["fast", "after"]
    else:
        assert h.durable, "the in-process bus has the fast path"
        assert outcomes == []
        assert rec.acked_ids == ["after"]


# -- members come and go (engines) ------------------------------------------------------


async def test_a_closed_member_leaves_its_position_to_the_next(
    make_harness: Callable[..., BusHarness],
) -> None:
    h = make_harness()
    if not h.durable:
        pytest.skip("the in-process bus keeps no position once its group is closed")
    first = Recorder()
    bus = await h.bus()
    async with await bus.subscribe("telemetry.>", "pipeline", first):
        await publish(bus, "m1")
        await eventually(lambda: first.acked_ids == ["m1"])
    await publish(bus, "m2")  # while the group has no member

    second = Recorder()
    await (await h.bus()).subscribe("telemetry.>", "pipeline", second)
    await eventually(lambda: second.acked_ids == ["m2"])


async def test_what_a_dead_member_held_is_redelivered_to_another(
    make_harness: Callable[..., BusHarness],
) -> None:
    h = make_harness()
    if not h.durable:
        pytest.skip("in-process: a dead consumer is a dead publisher; nothing was acknowledged")
    bus = await h.bus()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    settings = json.dumps(h.settings.model_dump(mode="json"))
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.contract.bus_member",
        settings,
        "telemetry.>",
        "pipeline",
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        async with asyncio.timeout(30):
            assert await child.stdout.readline() == b"ready\n"
            await publish(bus, "m1")
            assert await child.stdout.readline() == b"got m1 1\n"
            await publish(bus, "m2")  # stored behind m1, not delivered: the member is busy
    finally:
        if child.returncode is None:
            os.kill(child.pid, signal.SIGKILL)  # dies holding m1, unsettled
        await child.wait()
    await publish(bus, "m3")

    survivor = Recorder()
    await bus.subscribe("telemetry.>", "pipeline", survivor)
    await eventually(lambda: len(survivor.acked) == 3)
    assert survivor.seen == [("m1", 2), ("m2", 1), ("m3", 1)]  # what it held comes first


async def test_a_successor_settles_what_it_inherits_before_anything_newer(
    make_harness: Callable[..., BusHarness],
) -> None:
    """A holder whose last keep-alive came late (a loaded host: it lost its lease just
    before) must still have its messages come first: no timing margin to rely on."""
    h = make_harness()
    if not h.durable:
        pytest.skip("in-process: a group has one member, nothing to inherit")
    bus = await h.bus()
    late = await h.bus()
    assert isinstance(late, Engine)
    gid, pattern = group_id("pipeline", "telemetry.>"), "telemetry.>"
    await late.prepare_group(gid, pattern)
    partition = subjects.partition_of("dev-1", h.settings.partitions)
    holder = await late.open_source(gid, pattern, partition, "late-holder")
    await holder.take_over()
    await publish(bus, "m1")
    held: list[EngineMessage] = []
    for _ in range(3):  # Redis reads the holder's own pending entries first: none
        held = held or await holder.fetch(4, 5.0)
    assert [m.msg_id for m in held] == ["m1"]
    await publish(bus, "m2")
    await holder.keep_alive(held)  # its last word; no lease of it is left

    successor = Recorder()
    await bus.subscribe(pattern, "pipeline", successor)
    await eventually(lambda: len(successor.acked) == 2)
    assert successor.seen == [("m1", 2), ("m2", 1)]
    await publish(bus, "m3")  # and afterwards the partition flows as before
    await eventually(lambda: successor.acked_ids == ["m1", "m2", "m3"])


# -- the consumer the platform has -------------------------------------------------------


async def test_the_pipeline_stores_what_ingest_publishes(
    make_harness: Callable[..., BusHarness],
) -> None:
    h = make_harness()
    bus = await h.bus()
    store = RecordingStore()
    writer = BatchWriter(store, WriterSettings())
    await writer.start()
    pipeline = Pipeline(bus, writer, LatestValues())
    await pipeline.start()
    try:
        ingest = TelemetryIngest(bus, enqueue_timeout_s=5.0)
        for i in range(3):
            await ingest.submit(f"dev-{i}", [TsRecord(1000 + i, {"t": i})])
        await eventually(lambda: sorted(store.entities()) == ["dev-0", "dev-1", "dev-2"])
    finally:
        await pipeline.stop()
        await writer.stop()


async def test_a_traced_message_keeps_its_trace_across_the_bus(
    make_harness: Callable[..., BusHarness],
) -> None:
    """The traceparent rides in the message, so every bus carries it; on an engine the
    consumer is another connection, as another process would be."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from iotmesh.core.tracing import SpanKind, Tracing, context_of

    exporter = InMemorySpanExporter()
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = Tracing(provider.get_tracer("test"))
    h = make_harness()
    consumer_bus = await h.bus()
    store = RecordingStore()
    writer = BatchWriter(store, WriterSettings(), tracing.tracer)
    await writer.start()
    pipeline = Pipeline(consumer_bus, writer, LatestValues(), tracer=tracing.tracer)
    await pipeline.start()
    try:
        ingest = TelemetryIngest(await h.bus(), 5.0, tracing)
        root = tracing.start_root("transport", SpanKind.SERVER, {})
        await ingest.submit("dev-1", [TsRecord(1000, {"t": 1})], context_of(root))
        root.end()
        names = ["transport", "bus.publish", "pipeline.handle", "storage.commit"]
        await eventually(lambda: len(exporter.get_finished_spans()) == len(names))
    finally:
        await pipeline.stop()
        await writer.stop()
    spans = {span.name: span for span in exporter.get_finished_spans()}
    assert len({span.get_span_context().trace_id for span in spans.values()}) == 1
    for parent, child in itertools.pairwise(names):
        assert spans[child].parent is not None
        assert spans[child].parent.span_id == spans[parent].get_span_context().span_id
