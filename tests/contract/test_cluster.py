"""The contract of the cluster engine backends (Redis, NATS KV, Kubernetes): one suite.

Registry (TTL records, listing, watch), leases with fencing tokens, fenced writes,
against real redis-server and nats-server (JetStream) on loopback, and against a FAKE
Kubernetes API server (tests/k8s_fake.py): no Kubernetes cluster can run here.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from iotmesh.cluster import ClusterBackend, ClusterError, Instance, Registration, StaleToken
from tests.contract.cluster_backends import ENGINES, ClusterHarness, engine_settings


@pytest.fixture(params=ENGINES)
async def make_harness(
    request: pytest.FixtureRequest,
) -> AsyncIterator[Callable[..., ClusterHarness]]:
    made: list[ClusterHarness] = []
    engine = engine_settings(request, request.param)

    def make(**overrides: Any) -> ClusterHarness:
        h = ClusterHarness(request.param, **engine, **overrides)
        made.append(h)
        return h

    yield make
    for h in made:
        await h.close()


@pytest.fixture
async def backend(make_harness: Callable[..., ClusterHarness]) -> ClusterBackend:
    return await make_harness().backend()


def inst(service: str, iid: str, **kw: Any) -> Instance:
    return Instance(service=service, instance_id=iid, addresses=[f"http://127.0.0.1:1/{iid}"], **kw)


async def eventually(predicate: Callable[[], Any], within: float = 15.0) -> None:
    async with asyncio.timeout(within):
        while not await predicate():  # noqa: ASYNC110 (polling another connection)
            await asyncio.sleep(0.05)


async def test_put_list_remove(backend: ClusterBackend) -> None:
    assert await backend.list() == []
    await backend.put(inst("api", "b", version="1.2", load=3.0, metadata={"zone": "x"}))
    await backend.put(inst("api", "a"))
    await backend.put(inst("ingest", "c"))
    api = await backend.list("api")
    assert [i.instance_id for i in api] == ["a", "b"]
    assert api[1].version == "1.2"
    assert api[1].load == 3.0
    assert api[1].metadata == {"zone": "x"}
    assert [i.key for i in await backend.list()] == ["api.a", "api.b", "ingest.c"]
    await backend.put(inst("api", "a", seq=7))  # a rewrite replaces
    assert [i.seq for i in await backend.list("api")] == [7, 0]
    await backend.remove("api", "a")
    assert [i.key for i in await backend.list()] == ["api.b", "ingest.c"]
    assert await backend.list("nothing") == []


async def test_a_listing_shows_each_instance_once_while_they_heartbeat(
    backend: ClusterBackend,
) -> None:
    """Records rewritten while a listing runs: still one entry each, none missing.

    (A NATS KV watcher listed a key twice in half the listings of this test, and once
    missed one in CI: `iotmesh services` showed `alpha, alpha`.)"""
    beating = True

    async def beat(iid: str, pause: float) -> None:
        seq = 0
        while beating:
            seq += 1
            await backend.put(inst("api", iid, seq=seq))
            await asyncio.sleep(pause)

    await backend.put(inst("api", "a"))
    await backend.put(inst("api", "b"))
    beats = [asyncio.create_task(beat("a", 0.001)), asyncio.create_task(beat("b", 0.003))]
    try:
        listings = [[i.instance_id for i in await backend.list("api")] for _ in range(100)]
    finally:
        beating = False
        await asyncio.gather(*beats)
    assert all(listing == ["a", "b"] for listing in listings), [
        listing for listing in listings if listing != ["a", "b"]
    ][:3]


async def test_a_record_not_rewritten_expires_after_the_ttl(backend: ClusterBackend) -> None:
    await backend.put(inst("api", "a"))
    written = time.monotonic()

    async def gone() -> bool:
        return await backend.list("api") == []

    await eventually(gone)
    # Never before the TTL (1 s); the engine's timer may take a little longer.
    assert time.monotonic() - written >= 0.9


async def test_registration_heartbeats_and_deregisters_on_stop(
    make_harness: Callable[..., ClusterHarness],
) -> None:
    h = make_harness()
    writer, reader = await h.backend(), await h.backend()
    reg = Registration(
        writer, "api", interval_s=0.1, addresses=["http://127.0.0.1:9"], version="9", load=lambda: 2
    )
    async with reg:
        first = await reader.list("api")
        assert [i.instance_id for i in first] == [reg.instance.instance_id]
        assert first[0].load == 2.0
        assert first[0].version == "9"

        async def beating() -> bool:
            now = await reader.list("api")
            return bool(now) and now[0].seq >= first[0].seq + 3

        await eventually(beating)
        # Heartbeats keep it past several TTLs' worth of time? One is enough to show it.
        assert reg.health().ok
    assert await reader.list("api") == []  # gone at once, not after the TTL


async def test_watch_yields_changes(backend: ClusterBackend) -> None:
    seen: list[list[str]] = []

    async def watch() -> None:
        async for snapshot in backend.watch("api", 0.05):
            seen.append([i.instance_id for i in snapshot])
            if len(seen) == 3:
                return

    task = asyncio.create_task(watch())
    await asyncio.sleep(0.2)
    await backend.put(inst("api", "a"))
    await asyncio.sleep(0.2)
    await backend.remove("api", "a")
    async with asyncio.timeout(10):
        await task
    assert seen == [[], ["a"], []]


async def test_lease_is_exclusive_and_tokens_grow(
    make_harness: Callable[..., ClusterHarness],
) -> None:
    h = make_harness()
    one, two = await h.backend(), await h.backend()
    t1 = await one.acquire("job", "one", 5.0)
    assert t1 is not None
    assert await two.acquire("job", "two", 5.0) is None
    assert await one.holder("job") == ("one", t1)
    assert await one.renew("job", "one", t1, 5.0)
    assert not await two.renew("job", "two", t1, 5.0)  # not the holder
    assert not await two.renew("job", "one", t1 + 1000, 5.0)  # not this term
    await two.release("job", "two", t1)  # not the holder: no effect
    assert await two.holder("job") == ("one", t1)
    await one.release("job", "one", t1)
    assert await two.holder("job") is None
    t2 = await two.acquire("job", "two", 5.0)
    assert t2 is not None
    assert t2 > t1
    assert not await one.renew("job", "one", t1, 5.0)  # the old term cannot come back


async def test_an_unrenewed_lease_lapses_and_the_next_term_has_a_larger_token(
    make_harness: Callable[..., ClusterHarness],
) -> None:
    h = make_harness(lease_s=1.0)
    one, two = await h.backend(), await h.backend()
    t1 = await one.acquire("job", "one", 1.0)
    assert t1 is not None
    taken = time.monotonic()
    t2: int | None = None

    async def took() -> bool:
        nonlocal t2
        t2 = await two.acquire("job", "two", 1.0)
        return t2 is not None

    await eventually(took)
    assert time.monotonic() - taken >= 0.9
    assert t2 is not None
    assert t2 > t1
    assert not await one.renew("job", "one", t1, 1.0)


async def test_fenced_writes_refuse_older_tokens(
    make_harness: Callable[..., ClusterHarness],
) -> None:
    h = make_harness()
    a, b = await h.backend(), await h.backend()
    assert await a.read("retention") is None
    await a.write("retention", 5, b"from 5")
    await a.write("retention", 5, b"again 5")  # the same term may write again
    with pytest.raises(StaleToken) as caught:
        await b.write("retention", 4, b"from 4")
    assert (caught.value.token, caught.value.highest) == (4, 5)
    assert await b.read("retention") == (5, b"again 5")
    await b.write("retention", 6, b"from 6")
    with pytest.raises(StaleToken):
        await a.write("retention", 5, b"late 5")
    assert await a.read("retention") == (6, b"from 6")
    await a.write("other", 1, b"")  # per resource
    assert await a.read("other") == (1, b"")


async def test_concurrent_fenced_writes_keep_the_highest(
    make_harness: Callable[..., ClusterHarness],
) -> None:
    h = make_harness()
    clients = [await h.backend() for _ in range(3)]

    async def write(token: int) -> None:
        with contextlib.suppress(StaleToken):
            await clients[token % 3].write("r", token, str(token).encode())

    await asyncio.gather(*(write(t) for t in range(1, 31)))
    assert await clients[0].read("r") == (30, b"30")


async def test_nats_refuses_a_lease_bucket_with_another_lease() -> None:
    # Redis sets the TTL on each lease; a NATS KV bucket fixes it when it is made.
    first = ClusterHarness("nats", lease_s=1.0)
    second = ClusterHarness("nats", lease_s=2.0, namespace=first.settings.cluster.namespace)
    try:
        await (await first.backend()).acquire("job", "first", 1.0)
        other = await second.backend()
        assert await other.list() == []  # reading the registry is fine
        with pytest.raises(ClusterError, match="lease_s"):
            await other.acquire("job", "x", 2.0)
    finally:
        await second.close()
        await first.close()
