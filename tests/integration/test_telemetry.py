"""Device HTTP telemetry in, REST queries out, on a real `iotmesh run`."""

from __future__ import annotations

import time
from typing import Any

import httpx

from tests.integration.server import RunningServer

T0 = 1_700_000_000_000  # a whole minute


def _post(server: RunningServer, token: str, payload: Any) -> httpx.Response:
    with server.anonymous() as dev:
        return dev.post(f"/api/v1/{token}/telemetry", json=payload)


def test_three_forms_are_stored_with_types(
    server: RunningServer, admin: httpx.Client, device: dict[str, Any]
) -> None:
    token, dev_id = device["access_token"], device["id"]
    before = int(time.time() * 1000)
    assert _post(server, token, {"temperature": 21.5, "count": 3, "on": True}).status_code == 200
    after = int(time.time() * 1000)
    assert (
        _post(server, token, {"ts": T0, "values": {"temperature": 20.0, "mode": "eco"}}).status_code
        == 200
    )
    form3 = [
        {"ts": T0 + 1000, "values": {"temperature": 19}},
        {"ts": T0 + 2000, "values": {"cfg": {"a": [1, 2]}}},
    ]
    assert _post(server, token, form3).status_code == 200

    data = admin.get(
        f"/api/v1/devices/{dev_id}/telemetry",
        params={"keys": "temperature,count,on,mode,cfg", "order": "ASC"},
    ).json()
    temps = data["temperature"]
    assert [p["value"] for p in temps[:2]] == [20.0, 19]
    assert isinstance(temps[1]["value"], int)
    assert before <= temps[2]["ts"] <= after
    assert temps[2]["value"] == 21.5
    assert data["count"][0]["value"] == 3
    assert data["on"][0]["value"] is True
    assert data["mode"] == [{"ts": T0, "value": "eco"}]
    assert data["cfg"] == [{"ts": T0 + 2000, "value": {"a": [1, 2]}}]

    keys = admin.get(f"/api/v1/devices/{dev_id}/telemetry/keys").json()
    assert keys == ["cfg", "count", "mode", "on", "temperature"]


def test_range_order_limit_and_aggregation(
    server: RunningServer, admin: httpx.Client, device: dict[str, Any]
) -> None:
    points = [(T0 + i * 7_000, (i * 37) % 101 / 4) for i in range(60)]  # 7 minutes of data
    payload = [{"ts": ts, "values": {"v": value}} for ts, value in points]
    assert _post(server, device["access_token"], payload).status_code == 200
    url = f"/api/v1/devices/{device['id']}/telemetry"

    window = admin.get(
        url,
        params={
            "keys": "v",
            "start_ts": T0 + 70_000,
            "end_ts": T0 + 140_000,
            "order": "ASC",
            "limit": 1000,
        },
    ).json()["v"]
    expected = [{"ts": ts, "value": v} for ts, v in points if T0 + 70_000 <= ts <= T0 + 140_000]
    assert window == expected

    newest = admin.get(
        url, params={"keys": "v", "start_ts": T0, "end_ts": T0 + 10**6, "limit": 3}
    ).json()["v"]
    assert [p["ts"] for p in newest] == [ts for ts, _ in points[-3:]][::-1]

    for agg, fold in (
        ("AVG", lambda xs: sum(xs) / len(xs)),
        ("MIN", min),
        ("MAX", max),
        ("SUM", sum),
        ("COUNT", len),
    ):
        got = admin.get(
            url,
            params={
                "keys": "v",
                "start_ts": T0,
                "end_ts": T0 + 10**6,
                "agg": agg,
                "interval_ms": 60_000,
                "order": "ASC",
                "limit": 100,
            },
        ).json()["v"]
        buckets: dict[int, list[float]] = {}
        for ts, value in points:
            buckets.setdefault(ts - ts % 60_000, []).append(value)
        reference = [(start, fold(vals)) for start, vals in sorted(buckets.items())]
        assert [p["ts"] for p in got] == [start for start, _ in reference], agg
        for point, (_, value) in zip(got, reference, strict=True):
            assert abs(point["value"] - value) < 1e-9, agg


def test_latest_and_delete(
    server: RunningServer, admin: httpx.Client, device: dict[str, Any]
) -> None:
    token, dev_id = device["access_token"], device["id"]
    _post(
        server,
        token,
        [{"ts": T0 + 5, "values": {"a": 5, "b": "x"}}, {"ts": T0 + 1, "values": {"a": 1}}],
    )
    latest = admin.get(f"/api/v1/devices/{dev_id}/telemetry/latest").json()
    assert latest == {"a": [{"ts": T0 + 5, "value": 5}], "b": [{"ts": T0 + 5, "value": "x"}]}
    only_a = admin.get(f"/api/v1/devices/{dev_id}/telemetry/latest", params={"keys": "a"}).json()
    assert only_a == {"a": [{"ts": T0 + 5, "value": 5}]}

    deleted = admin.delete(
        f"/api/v1/devices/{dev_id}/telemetry",
        params={"keys": "a", "start_ts": T0 + 2, "end_ts": T0 + 10},
    )
    assert deleted.json() == {"deleted": 1}
    latest = admin.get(f"/api/v1/devices/{dev_id}/telemetry/latest").json()
    assert latest["a"] == [{"ts": T0 + 1, "value": 1}]

    assert admin.delete(f"/api/v1/devices/{dev_id}/telemetry").json() == {"deleted": 2}
    assert admin.get(f"/api/v1/devices/{dev_id}/telemetry/latest").json() == {}
    assert admin.get(f"/api/v1/devices/{dev_id}/telemetry/keys").json() == []


def test_device_errors(server: RunningServer, admin: httpx.Client, device: dict[str, Any]) -> None:
    token = device["access_token"]
    with server.anonymous() as dev:
        unknown = dev.post("/api/v1/not-a-token/telemetry", json={"t": 1})
        assert unknown.status_code == 401
        assert unknown.headers["content-type"] == "application/problem+json"

        malformed = dev.post(
            f"/api/v1/{token}/telemetry",
            content=b'{"t": 1',
            headers={"content-type": "application/json"},
        )
        assert malformed.status_code == 400
        assert "malformed JSON" in malformed.json()["detail"]

        for bad in ([], {}, {"t": None}, {"ts": "yesterday", "values": {"t": 1}}, 42):
            r = dev.post(f"/api/v1/{token}/telemetry", json=bad)
            assert r.status_code == 400, bad
            assert r.json()["detail"]

        big = {"k": "x" * 70_000}
        too_large = dev.post(f"/api/v1/{token}/telemetry", json=big)
        assert too_large.status_code == 413
        assert "limit" in too_large.json()["detail"]

        # Chunked upload without Content-Length is cut off at the limit too.
        def chunks() -> Any:
            for _ in range(100):
                yield b" " * 1024

        chunked = dev.post(f"/api/v1/{token}/telemetry", content=chunks())
        assert chunked.status_code == 413

        assert dev.post(f"/api/v1/{token}/telemetry", json={"t": 1}).status_code == 200

    bad_query = admin.get(
        f"/api/v1/devices/{device['id']}/telemetry", params={"keys": "t", "agg": "AVG"}
    )
    assert bad_query.status_code == 400
    assert "interval_ms" in bad_query.json()["detail"]
    assert (
        admin.get(
            f"/api/v1/devices/{device['id']}/telemetry", params={"agg": "MEDIAN", "interval_ms": 1}
        ).status_code
        == 400
    )
    missing = admin.get("/api/v1/devices/00000000-0000-0000-0000-000000000000/telemetry")
    assert missing.status_code == 404
