"""Long-polls of the device HTTP API: wait for one event, the client leaving, or a timeout.

A long-poll (`GET /api/v1/{token}/attributes/updates`, `GET /api/v1/{token}/rpc`)
registers a listener for the duration of one request and answers the first event. Three
things end the wait, whichever comes first: the event, the timeout (the caller answers
408, as ThingsBoard does), the client closing its connection or stream (the ASGI
server then delivers `http.disconnect`; nobody is left to answer), or the server
stopping (`LongPolls.close`: 503, poll again). The caller
unregisters its listener in a `finally`, so no path leaves one behind; `LongPolls`
counts the waits in progress so that this can be checked from outside (`GET
/api/v1/stats`, section `http`).
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any, TypeVar

from iotmesh.api.body import ClientGone, Receive
from iotmesh.core.errors import Overloaded

T = TypeVar("T")


class LongPolls:
    """Counters of the device long-polls of one HTTP API (for stats and tests)."""

    def __init__(self) -> None:
        self.closing = asyncio.Event()
        self.waiting: collections.Counter[str] = collections.Counter()
        self.answered = 0
        self.timed_out = 0
        self.abandoned = 0

    def close(self) -> None:
        """The server is stopping: end every waiting poll now (503, poll again) rather
        than hold the shutdown up for up to `http.long_poll_max_s`."""
        self.closing.set()

    def stats(self) -> dict[str, int]:
        """Long-polls waiting now by kind, and how the finished ones ended."""
        return {
            "long_polls_attributes": self.waiting["attributes"],
            "long_polls_rpc": self.waiting["rpc"],
            "long_polls_answered": self.answered,
            "long_polls_timed_out": self.timed_out,
            "long_polls_abandoned": self.abandoned,
        }


async def _disconnected(receive: Receive) -> None:
    """Return when the ASGI server reports that the client went away."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def wait_event(
    event: asyncio.Future[T], receive: Receive, timeout_s: float, polls: LongPolls, kind: str
) -> T | None:
    """Wait for `event` for at most `timeout_s`; None when the time ran out.

    The request body must have been read (a GET has none), as `receive` is then only
    used to notice the client leaving.

    Raises:
        ClientGone: the client left first; `event` is cancelled if it was still pending.
        Overloaded: the server is stopping (503 with Retry-After: poll again).
    """
    gone: asyncio.Future[None] = asyncio.ensure_future(_disconnected(receive))
    closing = asyncio.ensure_future(polls.closing.wait())
    polls.waiting[kind] += 1
    try:
        waits: set[asyncio.Future[Any]] = {event, gone, closing}
        await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        polls.waiting[kind] -= 1
        gone.cancel()
        closing.cancel()
    if gone.done() and not gone.cancelled():
        polls.abandoned += 1
        event.cancel()
        raise ClientGone("the client closed the long-poll")
    if event.done():
        polls.answered += 1
        return event.result()
    if polls.closing.is_set():
        event.cancel()
        raise Overloaded("the server is shutting down; poll again", retry_after=5)
    polls.timed_out += 1
    event.cancel()
    return None
