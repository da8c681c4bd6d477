"""BatchWriter: group commit, order, back-pressure, retries and the flush on stop.

The store is a recording double: these tests are about the writer's queueing logic, and
the double lets a test hold a commit open (`gate`) or make it fail on demand.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import pytest

from iotmesh.core.errors import Overloaded, PayloadError, StorageError
from iotmesh.core.settings import WriterSettings
from iotmesh.core.types import TsRecord
from iotmesh.storage.timeseries import SeriesWrite
from iotmesh.storage.writer import BatchWriter
from tests.unit.doubles import RecordingStore


def series(entity_id: str, records: int = 1) -> list[SeriesWrite]:
    """A one-series batch of `records` records."""
    return [SeriesWrite(entity_id, [TsRecord(ts, {"t": ts}) for ts in range(records)])]


@contextlib.asynccontextmanager
async def running_writer(store: RecordingStore, **settings: Any) -> AsyncIterator[BatchWriter]:
    writer = BatchWriter(store, WriterSettings(**settings))
    await writer.start()
    try:
        yield writer
    finally:
        store.gate.set()
        await writer.stop()


async def eventually(predicate: Callable[[], bool], within: float = 2.0) -> None:
    """Let the event loop run until `predicate` holds; a hang fails fast instead of at 120 s."""
    async with asyncio.timeout(within):
        # Polling: the code under test exposes no event for these states (queue depths).
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.001)


def write(writer: BatchWriter, batch: list[SeriesWrite], **kw: Any) -> asyncio.Task[None]:
    return asyncio.create_task(writer.write(batch, **kw), name=f"write-{batch[0].entity_id}")


async def test_concurrent_writes_are_group_committed() -> None:
    store = RecordingStore()
    store.gate.clear()
    async with running_writer(store) as writer:
        first = write(writer, series("d0"))
        await store.in_write.wait()  # d0's commit is open; the rest queue up behind it

        written_before_return: list[bool] = []

        async def write_and_check(entity_id: str) -> None:
            batch = series(entity_id)
            await writer.write(batch)
            written_before_return.append(entity_id in store.entities())

        others = [asyncio.create_task(write_and_check(f"d{i}")) for i in range(1, 6)]
        await eventually(lambda: writer.pending_records == 6)
        assert not first.done()
        assert not any(t.done() for t in others)

        store.gate.set()
        await asyncio.gather(first, *others)

    assert store.calls == 2
    assert [len(batch) for batch in store.writes] == [1, 5]
    assert written_before_return == [True] * 5
    assert writer.counters.commits == 2
    assert writer.counters.records == 6
    assert writer.pending_records == 0


async def test_batches_commit_in_submission_order() -> None:
    store = RecordingStore()
    store.gate.clear()
    async with running_writer(store, max_batch_records=3) as writer:
        tasks = [write(writer, series(f"d{i}")) for i in range(10)]
        await store.in_write.wait()
        store.gate.set()
        await asyncio.gather(*tasks)

    assert store.entities() == [f"d{i}" for i in range(10)]
    assert all(sum(len(s.records) for s in batch) <= 3 for batch in store.writes)
    assert len(store.writes) > 1


async def test_full_queue_makes_write_raise_overloaded() -> None:
    limit = 4
    store = RecordingStore()
    store.gate.clear()
    async with running_writer(store, max_pending_records=limit) as writer:
        high_water = 0

        def sample() -> None:
            nonlocal high_water
            high_water = max(high_water, writer.pending_records)

        store.on_write = sample
        first = write(writer, series("d0", 2))  # committing, still counted as pending
        await store.in_write.wait()
        second = write(writer, series("d1", 2))  # fills the queue to the limit
        await eventually(lambda: writer.pending_records == limit)

        with pytest.raises(Overloaded, match="saturated"):
            await writer.write(series("d2", 1), timeout=0.05)
        assert writer.pending_records == limit

        waiting = write(writer, series("d3", 2))  # no timeout: waits for room
        await asyncio.sleep(0)
        assert writer.pending_records == limit
        assert not waiting.done()

        store.gate.set()
        await asyncio.gather(first, second, waiting)
        sample()

    assert high_water <= limit
    assert "d2" not in store.entities()
    assert store.entities() == ["d0", "d1", "d3"]
    assert writer.pending_records == 0


async def test_batch_larger_than_the_limit_is_let_in_alone() -> None:
    store = RecordingStore()
    async with running_writer(store, max_pending_records=2, max_batch_records=2) as writer:
        await writer.write(series("big", 5), timeout=0.05)
    assert store.entities() == ["big"]


async def test_failed_commits_are_retried_until_they_succeed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = RecordingStore(failures=2)
    async with running_writer(store, retry_backoff_max_s=0.001) as writer:
        await writer.write(series("d0"))
        assert writer.health().ok

    assert store.calls == 3
    assert store.entities() == ["d0"]
    assert writer.counters.failed_commits == 2
    assert writer.counters.commits == 1
    assert sum("commit failed" in r.getMessage() for r in caplog.records) == 2


async def test_health_reports_failing_commits() -> None:
    store = RecordingStore(always_fail=True)
    async with running_writer(store, retry_backoff_max_s=0.01) as writer:
        pending = write(writer, series("d0"))
        await eventually(lambda: writer.counters.failed_commits >= 1)
        health = writer.health()
        assert not health.ok
        assert "failing" in health.detail
        store.always_fail = False
        await pending
        assert writer.health().ok


async def test_retry_pauses_never_exceed_retry_backoff_max(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pauses: list[float] = []
    real_sleep = asyncio.sleep

    async def recording_sleep(delay: float, result: Any = None) -> Any:
        if delay:  # sleep(0) is the writer yielding to senders, not a pause
            pauses.append(delay)
        return await real_sleep(0, result)

    store = RecordingStore(failures=3)
    async with running_writer(store, retry_backoff_max_s=0.001) as writer:
        monkeypatch.setattr(asyncio, "sleep", recording_sleep)
        await writer.write(series("d0"))
        monkeypatch.undo()

    assert len(pauses) == 3
    assert all(p <= 0.001 for p in pauses), pauses


async def test_stop_flushes_pending_batches() -> None:
    store = RecordingStore()
    store.gate.clear()
    writer = BatchWriter(store, WriterSettings())
    await writer.start()
    tasks = [write(writer, series(f"d{i}")) for i in range(4)]
    await store.in_write.wait()
    await eventually(lambda: writer.pending_records == 4)

    stopping = asyncio.create_task(writer.stop(), name="writer-stop")
    await asyncio.sleep(0)
    assert not stopping.done()
    store.gate.set()
    await stopping

    await asyncio.gather(*tasks)  # every sender returns normally
    assert store.entities() == ["d0", "d1", "d2", "d3"]
    assert writer.pending_records == 0


async def test_stop_fails_batches_that_still_cannot_be_committed() -> None:
    store = RecordingStore(always_fail=True)
    writer = BatchWriter(store, WriterSettings(retry_backoff_max_s=0.01))
    await writer.start()
    tasks = [write(writer, series(f"d{i}")) for i in range(3)]
    await eventually(lambda: writer.counters.failed_commits >= 1)

    await writer.stop()

    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, StorageError) for r in results), results
    assert writer.pending_records == 0
    assert store.writes == []


async def test_stop_does_not_strand_senders_waiting_for_room() -> None:
    store = RecordingStore()
    store.gate.clear()
    writer = BatchWriter(store, WriterSettings(max_pending_records=2))
    await writer.start()
    committing = write(writer, series("d0", 2))
    await store.in_write.wait()
    waiting = [write(writer, series(f"d{i}", 2)) for i in (1, 2)]
    await asyncio.sleep(0)

    stopping = asyncio.create_task(writer.stop(), name="writer-stop")
    await asyncio.sleep(0)
    store.gate.set()
    await stopping
    await committing

    # Committed or failed back with StorageError are both fine; waiting forever is not.
    done, _ = await asyncio.wait(waiting, timeout=0.2)
    for task in waiting:
        if not task.done():
            task.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
    assert len(done) == 2


async def test_write_after_stop_raises_storage_error() -> None:
    store = RecordingStore()
    writer = BatchWriter(store, WriterSettings())
    await writer.start()
    await writer.stop()
    with pytest.raises(StorageError, match="stopped"):
        await writer.write(series("d0"))
    await writer.write([])  # an empty batch has nothing to commit: it returns at once
    assert store.calls == 0


async def test_delay_ms_still_commits(monkeypatch: pytest.MonkeyPatch) -> None:
    pauses: list[float] = []
    real_sleep = asyncio.sleep

    async def recording_sleep(delay: float, result: Any = None) -> Any:
        if delay:  # sleep(0) is the writer yielding to senders, not a pause
            pauses.append(delay)
        return await real_sleep(0, result)

    store = RecordingStore()
    async with running_writer(store, delay_ms=5) as writer:
        monkeypatch.setattr(asyncio, "sleep", recording_sleep)
        await asyncio.gather(*(writer.write(series(f"d{i}")) for i in range(3)))
        monkeypatch.undo()

    assert sorted(store.entities()) == ["d0", "d1", "d2"]
    assert pauses
    assert set(pauses) == {0.005}  # the pause asked for before each commit, not a timing


async def test_a_refused_batch_fails_only_its_own_sender() -> None:
    """A batch the store refuses as data does not take the others down with it."""

    class PickyStore(RecordingStore):
        async def write(self, batch: Sequence[SeriesWrite]) -> None:
            if any(s.entity_id == "bad" for s in batch):
                raise PayloadError("cannot store this")
            await super().write(batch)

    store = PickyStore()
    writer = BatchWriter(store, WriterSettings())
    await writer.start()
    try:
        results = await asyncio.gather(
            writer.write([SeriesWrite("good-1", [TsRecord(1, {"v": 1})])]),
            writer.write([SeriesWrite("bad", [TsRecord(1, {"v": 1})])]),
            writer.write([SeriesWrite("good-2", [TsRecord(1, {"v": 1})])]),
            return_exceptions=True,
        )
    finally:
        await writer.stop()
    assert results[0] is None
    assert isinstance(results[1], PayloadError)
    assert results[2] is None
    assert set(store.entities()) == {"good-1", "good-2"}
