"""Long-polls of the device HTTP API: wait for one event, the client leaving, or a timeout.

A long-poll (`GET /api/v1/{token}/attributes/updates`, `GET /api/v1/{token}/rpc`)
registers a listener for the duration of one request and answers the first event. Three
things end the wait, whichever comes first: the event, the timeout (the caller answers
408, as ThingsBoard does), or the client closing its connection or stream (the ASGI
server then delivers `http.disconnect`; nobody is left to answer). The caller
unregisters its listener in a `finally`, so no path leaves one behind; `LongPolls`
counts the waits in progress so that this can be checked from outside (`GET
/api/v1/stats`, section `http`).
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any, TypeVar

from iotmesh.api.body import ClientGone, Receive

T = TypeVar("T")


class LongPolls:
    """Counters of the device long-polls of one HTTP API (for stats and tests)."""

    def __init__(self) -> None:
        self.waiting: collections.Counter[str] = collections.Counter()
        self.answered = 0
        self.timed_out = 0
        self.abandoned = 0

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
    """
    gone: asyncio.Future[None] = asyncio.ensure_future(_disconnected(receive))
    polls.waiting[kind] += 1
    try:
        waits: set[asyncio.Future[Any]] = {event, gone}
        await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        polls.waiting[kind] -= 1
        gone.cancel()
    if gone.done() and not gone.cancelled():
        polls.abandoned += 1
        event.cancel()
        raise ClientGone("the client closed the long-poll")
    if event.done():
        polls.answered += 1
        return event.result()
    polls.timed_out += 1
    event.cancel()
    return None
