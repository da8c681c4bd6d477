"""The contract of `pipeline.latest.LatestCache`: memory and Redis must pass this suite.

The rules are the module docstring of `iotmesh.pipeline.latest`: a device not cached is
None; `fill` caches; `update` keeps the newest timestamp per key (equal replaces),
whatever order batches come in; updates do not make a device cached; `invalidate`
forgets; every value kind round-trips. Redis runs against the local server.
"""

from __future__ import annotations

from typing import Any

import pytest

from iotmesh.core.types import TelemetryMessage, TsPoint, TsRecord
from iotmesh.pipeline.latest import LatestCache, LatestValues
from iotmesh.storage.redis import RedisLatestValues
from tests.redis_hot import HotFactory


@pytest.fixture(params=["memory", "redis"])
async def latest(request: pytest.FixtureRequest, redis_hot: HotFactory) -> LatestCache:
    if request.param == "memory":
        return LatestValues()
    return RedisLatestValues(await redis_hot())


def msg(device_id: str, *records: tuple[int, dict[str, Any]]) -> TelemetryMessage:
    return TelemetryMessage("m", device_id, 0, [TsRecord(ts, values) for ts, values in records])


async def test_a_device_not_cached_is_a_miss_until_filled(latest: LatestCache) -> None:
    assert await latest.get("d1") is None
    await latest.fill("d1", {"t": TsPoint(1, 20.5)})
    assert await latest.get("d1") == {"t": TsPoint(1, 20.5)}
    await latest.fill("d2", {})
    assert await latest.get("d2") == {}


async def test_updates_do_not_make_a_device_cached(latest: LatestCache) -> None:
    await latest.update([msg("d1", (5, {"t": 1}))])
    assert await latest.get("d1") is None


async def test_newest_wins_whatever_the_order(latest: LatestCache) -> None:
    await latest.fill("d1", {"t": TsPoint(10, 1), "h": TsPoint(10, 50)})
    await latest.update([msg("d1", (20, {"t": 2}), (15, {"t": 99, "h": 51}))])
    await latest.update([msg("d1", (5, {"t": 0, "h": 0, "new": "x"}))])
    await latest.update([msg("d1", (20, {"h": 52}))])
    assert await latest.get("d1") == {
        "t": TsPoint(20, 2),
        "h": TsPoint(20, 52),
        "new": TsPoint(5, "x"),
    }
    # An equal timestamp replaces (a device resending a corrected value).
    await latest.update([msg("d1", (20, {"t": 3}))])
    assert (await latest.get("d1") or {})["t"] == TsPoint(20, 3)


async def test_one_batch_with_several_messages_of_a_device(latest: LatestCache) -> None:
    await latest.fill("d1", {})
    await latest.update([msg("d1", (30, {"t": 3})), msg("d1", (10, {"t": 1})), msg("d2", (1, {}))])
    assert await latest.get("d1") == {"t": TsPoint(30, 3)}


@pytest.mark.parametrize(
    "value",
    [True, False, 0, -(2**62), 2**62, 1.0, -0.5, 1e300, "", "text ü ☃", {"a": [1, 2.5, None]}, [1]],
    ids=repr,
)
async def test_value_kinds_round_trip(latest: LatestCache, value: Any) -> None:
    await latest.fill("d1", {"filled": TsPoint(1, value)})
    await latest.update([msg("d1", (2, {"updated": value}))])
    got = await latest.get("d1")
    assert got == {"filled": TsPoint(1, value), "updated": TsPoint(2, value)}
    assert type(got["updated"].value) is type(value)  # bool stays bool, 1.0 stays float


async def test_invalidate_forgets_a_device(latest: LatestCache) -> None:
    await latest.fill("d1", {"t": TsPoint(1, 1)})
    await latest.fill("d2", {"t": TsPoint(1, 2)})
    await latest.invalidate("d1")
    await latest.invalidate("never-cached")
    assert await latest.get("d1") is None
    assert await latest.get("d2") == {"t": TsPoint(1, 2)}
    await latest.update([msg("d1", (5, {"t": 5}))])
    assert await latest.get("d1") is None


async def test_many_devices_in_one_batch(latest: LatestCache) -> None:
    ids = [f"dev-{n}" for n in range(500)]
    for n, device_id in enumerate(ids):
        await latest.fill(device_id, {"n": TsPoint(0, -1), "k": TsPoint(0, n)})
    await latest.update([msg(d, (n, {"n": n}), (n + 1, {"m": str(n)})) for n, d in enumerate(ids)])
    for n, device_id in enumerate(ids):
        assert await latest.get(device_id) == {
            "n": TsPoint(n, n),
            "k": TsPoint(0, n),
            "m": TsPoint(n + 1, str(n)),
        }
