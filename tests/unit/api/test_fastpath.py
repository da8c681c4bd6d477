"""The telemetry fast path's request matching and the shared body reader (fuzzed)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import MutableMapping
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iotmesh.api.body import DRAIN_LIMIT, ClientGone, receive_body
from iotmesh.api.fastpath import telemetry_token
from iotmesh.core.errors import PayloadError, PayloadTooLarge

# What Starlette matches for the route "/api/v1/{access_token}/telemetry".
ROUTE = re.compile(r"^/api/v1/(?P<token>[^/]+)/telemetry$")

_path_parts = st.sampled_from(["/api/v1/", "/telemetry", "/", "api", "v1", "tok", "", "%2F", "."])
paths = st.lists(st.one_of(_path_parts, st.text(max_size=8)), max_size=6).map("".join)


@given(path=paths, method=st.sampled_from(["POST", "GET", "PUT"]))
def test_token_matches_the_fastapi_route(path: str, method: str) -> None:
    match = ROUTE.match(path)
    expected = match["token"] if match and method == "POST" else None
    assert telemetry_token({"type": "http", "method": method, "path": path}) == expected


def test_only_http_scopes_match() -> None:
    assert telemetry_token({"type": "lifespan"}) is None
    scope = {"type": "websocket", "method": "POST", "path": "/api/v1/t/telemetry"}
    assert telemetry_token(scope) is None


def _receiver(chunks: list[bytes], disconnect: bool = False) -> Any:
    messages: list[MutableMapping[str, Any]] = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
        for i, c in enumerate(chunks or [b""])
    ]
    if disconnect:
        messages[-1]["more_body"] = True
        messages.append({"type": "http.disconnect"})
    calls = iter(messages)

    async def receive() -> MutableMapping[str, Any]:
        return next(calls)  # StopIteration here: read past the end of the body

    return receive


chunk_lists = st.lists(st.binary(max_size=300), max_size=8)


@given(chunks=chunk_lists, limit=st.integers(1, 1200), declare=st.booleans())
def test_body_is_whole_or_refused(chunks: list[bytes], limit: int, declare: bool) -> None:
    total = b"".join(chunks)
    length = str(len(total)) if declare else None

    async def read() -> bytes:
        return await receive_body(_receiver(chunks), length, limit)

    if len(total) > limit:
        with pytest.raises(PayloadTooLarge):
            asyncio.run(read())
    else:
        assert asyncio.run(read()) == total


@given(chunks=chunk_lists)
def test_client_leaving_mid_body(chunks: list[bytes]) -> None:
    with pytest.raises(ClientGone):
        asyncio.run(receive_body(_receiver(chunks, disconnect=True), None, 10_000))


def test_declared_length_is_checked_before_reading() -> None:
    async def never() -> MutableMapping[str, Any]:
        raise AssertionError("read a body that was declared too large")

    with pytest.raises(PayloadTooLarge):
        asyncio.run(receive_body(never, str(DRAIN_LIMIT + 1), 100))
    with pytest.raises(PayloadError, match="Content-Length"):
        asyncio.run(receive_body(never, "ten", 100))
