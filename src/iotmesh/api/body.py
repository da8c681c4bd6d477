"""Request bodies of the device API, read from ASGI `receive` within a size limit.

Shared by the FastAPI routes and the ASGI fast path (api/fastpath.py), so both refuse
the same bodies the same way: 413 for more than the limit (by Content-Length before
reading, or while reading), 400 for a Content-Length that is not a number.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from iotmesh.core.errors import IotmeshError, PayloadError, PayloadTooLarge

Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]

# An oversized body is read and discarded up to this many bytes before the 413 goes
# out: an HTTP/1.1 client still sending would otherwise see the connection reset
# instead of the answer. Beyond it the server answers at once and closes.
DRAIN_LIMIT = 1 << 20


class ClientGone(IotmeshError):
    """The client closed its connection (or stream) before the exchange ended."""


async def _chunks(receive: Receive) -> Any:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone("the client closed the request")
        chunk = message.get("body", b"")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


async def _discard_rest(receive: Receive, already: int) -> None:
    async for chunk in _chunks(receive):
        already += len(chunk)
        if already > DRAIN_LIMIT:
            return


async def receive_body(receive: Receive, content_length: bytes | str | None, limit: int) -> bytes:
    """Read the whole request body, refusing more than `limit` bytes without keeping it.

    Raises:
        PayloadTooLarge: over `limit`.
        PayloadError: Content-Length is not a number.
        ClientGone: the client left before the body was complete.
    """
    if content_length is not None:
        try:
            size = int(content_length)
        except ValueError:
            raise PayloadError("Content-Length is not a number") from None
        if size > limit:
            if size <= DRAIN_LIMIT:
                await _discard_rest(receive, 0)
            raise PayloadTooLarge(size, limit)
    body = b""
    async for chunk in _chunks(receive):
        body += chunk  # almost always one chunk: no copy then
        if len(body) > limit:
            await _discard_rest(receive, len(body))
            raise PayloadTooLarge(len(body), limit)
    return body
