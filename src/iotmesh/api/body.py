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


async def _next(receive: Receive) -> tuple[bytes, bool]:
    """The next piece of the body and whether more follows."""
    message = await receive()
    if message["type"] == "http.disconnect":
        raise ClientGone("the client closed the request")
    return message.get("body", b""), message.get("more_body", False)


async def _discard_rest(receive: Receive, already: int) -> None:
    """Read and drop the rest of a body (up to DRAIN_LIMIT bytes in all)."""
    more = True
    while more and already <= DRAIN_LIMIT:
        chunk, more = await _next(receive)
        already += len(chunk)


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
    more = True
    while more:  # never past the last message: `receive` would wait for a disconnect
        chunk, more = await _next(receive)
        body += chunk  # almost always one chunk: no copy then
        if len(body) > limit:
            if more:
                await _discard_rest(receive, len(body))
            raise PayloadTooLarge(len(body), limit)
    return body
