"""InfluxDB client: error mapping and the 2.x request shapes.

These use httpx.MockTransport because no real server here answers 5xx or 401 on demand
and InfluxDB 2.x/3.x is not installed; everything a real InfluxDB 1.x can show is tested
against influxd in tests/contract and tests/integration.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import httpx
import pytest
from pydantic import SecretStr

from iotmesh.core.errors import PayloadError, StorageError
from iotmesh.core.settings import InfluxSettings
from iotmesh.core.types import TsPoint, TsRecord
from iotmesh.storage.influx import InfluxClient, InfluxTimeSeriesStore
from iotmesh.storage.timeseries import SeriesWrite

Handler = Callable[[httpx.Request], httpx.Response]


def _client(handler: Handler, **settings: object) -> InfluxClient:
    return InfluxClient(InfluxSettings(**settings), httpx.MockTransport(handler))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("status", "error"),
    [(500, StorageError), (503, StorageError), (401, StorageError), (404, StorageError)],
)
async def test_write_failures_are_storage_errors(status: int, error: type[Exception]) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, json={"error": "boom"})

    async with _client(handler) as client:
        with pytest.raises(error, match="boom"):
            await client.write(b"telemetry,entity=a,key=b kind=1i,v_l=1i 1\n")


async def test_refused_points_are_payload_errors() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, headers={"X-Influxdb-Error": "unable to parse 'x'"})

    async with _client(handler) as client:
        with pytest.raises(PayloadError, match="unable to parse"):
            await client.write(b"x\n")


async def test_unreachable_is_a_storage_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    async with _client(handler) as client:
        with pytest.raises(StorageError, match="unreachable"):
            await client.ping()


async def test_statement_errors_are_storage_errors() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        body = {"results": [{"statement_id": 0, "error": "database not found: x"}]}
        return httpx.Response(200, content=json.dumps(body).encode() + b"\n")

    async with _client(handler) as client:
        with pytest.raises(StorageError, match="database not found"):
            await client.query(["SELECT 1"])


async def test_chunks_of_one_series_are_joined() -> None:
    def chunk(tag: str, rows: list[list[object]]) -> bytes:
        series = {"name": "telemetry", "tags": {"key": tag}, "columns": ["time", "kind"]}
        result = {"statement_id": 0, "series": [{**series, "values": rows}], "partial": True}
        return json.dumps({"results": [result]}).encode() + b"\n"

    def handler(request: httpx.Request) -> httpx.Response:
        assert b"chunked=true" in request.content
        return httpx.Response(
            200, content=chunk("a", [[1, 0]]) + chunk("a", [[2, 0]]) + chunk("b", [[1, 1]])
        )

    async with _client(handler) as client:
        (result,) = await client.query(["SELECT kind FROM telemetry"])
    assert [(s.tags, s.values) for s in result] == [
        ({"key": "a"}, [[1, 0], [2, 0]]),
        ({"key": "b"}, [[1, 1]]),
    ]


async def test_version_2_uses_token_org_bucket_and_the_v1_query_endpoint() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/ping":
            return httpx.Response(204, headers={"X-Influxdb-Version": "v2.7.1"})
        if request.url.path in ("/api/v2/write", "/api/v2/delete"):
            return httpx.Response(204)
        row = [1000, 1, None, 7, None, None, None]
        columns = ["time", "last", "v_d", "v_l", "v_b", "v_s", "v_j"]
        series = {"name": "telemetry", "tags": {"key": "t"}, "columns": columns}
        series["values"] = [row]
        body = {"results": [{"statement_id": 0, "series": [series]}]}
        return httpx.Response(200, content=json.dumps(body).encode())

    settings = InfluxSettings(
        url="http://influx:8086", version=2, token=SecretStr("tok"), org="acme", bucket="b1"
    )
    store = InfluxTimeSeriesStore(settings, httpx.MockTransport(handler))
    await store.open()
    try:
        await store.write([SeriesWrite("dev", [TsRecord(1000, {"t": 7})])])
        assert await store.latest("dev") == {"t": TsPoint(1000, 7)}
        await store.delete_entity("dev")
    finally:
        await store.close()
    assert all(r.headers["Authorization"] == "Token tok" for r in seen)
    write = next(r for r in seen if r.url.path == "/api/v2/write")
    assert dict(write.url.params) == {"org": "acme", "bucket": "b1", "precision": "ms"}
    assert write.content == b"telemetry,entity=dev,key=t kind=1i,v_l=7i 1000\n"
    query = next(r for r in seen if r.url.path == "/query")
    assert b"db=b1" in query.content
    delete = next(r for r in seen if r.url.path == "/api/v2/delete")
    assert json.loads(delete.content)["predicate"] == 'entity="dev"'


async def test_a_server_limit_is_a_storage_error_not_bad_data() -> None:
    reason = "partial write: max-series-per-database limit exceeded: (5) dropped=4"

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, headers={"X-Influxdb-Error": reason})

    async with _client(handler) as client:
        with pytest.raises(StorageError, match="raise the limit") as caught:
            await client.write(b"x\n")
    assert not isinstance(caught.value, PayloadError)


async def test_close_waits_for_a_write_in_progress() -> None:
    entered, release = asyncio.Event(), asyncio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/write":
            entered.set()
            await release.wait()
            return httpx.Response(204)
        if request.url.path == "/ping":
            return httpx.Response(204)
        body = {"results": [{"statement_id": 0, "series": [{"values": [["iotmesh"]]}]}]}
        return httpx.Response(200, content=json.dumps(body).encode())

    store = InfluxTimeSeriesStore(InfluxSettings(), httpx.MockTransport(handler))
    await store.open()
    write = asyncio.create_task(store.write([SeriesWrite("d", [TsRecord(1, {"t": 1})])]))
    await entered.wait()
    close = asyncio.create_task(store.close())
    await asyncio.sleep(0.01)
    assert not close.done()
    release.set()
    await write  # the write completed, not cut off by close
    await close
