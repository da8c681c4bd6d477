"""`iotmesh export` reads lazily: one page per key in memory, pages follow the cursor."""

from __future__ import annotations

from typing import Any

from iotmesh.cli.export import parse_time, rows


class FakeApi:
    """Serves `limit` points per request from in-memory series; records the requests."""

    def __init__(self, series: dict[str, list[int]]) -> None:
        self.series = series
        self.requests: list[dict[str, Any]] = []

    def request(self, method: str, path: str, params: dict[str, Any]) -> Any:
        self.requests.append(params)
        key = params["keys"]
        got = [t for t in self.series[key] if params["start_ts"] <= t <= params["end_ts"]]
        return {key: [{"ts": t, "value": t} for t in got[: params["limit"]]]}


def test_pages_are_fetched_as_the_merge_needs_them() -> None:
    api = FakeApi({"a": list(range(0, 100, 2)), "b": list(range(1, 100, 3))})
    stream = rows(api, "dev", ["a", "b"], 0, 1000, 10)  # type: ignore[arg-type]
    assert next(stream) == (0, "a", 0)
    assert len(api.requests) == 2  # one page of each key, nothing more yet
    rest = list(stream)
    everything = [(0, "a", 0), *rest]
    assert [t for t, _, _ in everything] == sorted(list(range(0, 100, 2)) + list(range(1, 100, 3)))
    assert [r["start_ts"] for r in api.requests if r["keys"] == "a"] == [0, 19, 39, 59, 79, 99]


def test_times() -> None:
    assert parse_time("1700000000000") == 1_700_000_000_000
    assert parse_time("2023-11-14T22:13:20") == 1_700_000_000_000
    assert parse_time("2023-11-14T23:13:20+01:00") == 1_700_000_000_000
