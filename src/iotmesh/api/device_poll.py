"""Long-polls of the ThingsBoard device HTTP API: shared attribute updates and RPC.

    GET /api/v1/{token}/attributes/updates?timeout=ms   → the next shared-attribute change
    GET /api/v1/{token}/rpc?timeout=ms                  → the next server-side RPC request

`timeout` is in milliseconds, as in ThingsBoard; absent or 0 means
`http.long_poll_default_s`, and it is cut to `http.long_poll_max_s`. When nothing came
in time the answer is 408 (ThingsBoard answers 408 too); the device polls again.

While a poll waits, the device has a live session over HTTP (`ctx.connectivity`
`opened`/`closed`) and a listener registered with the attribute or RPC service; the
listener is removed in a `finally` whatever ends the wait (see `api/polls.py`).

RPC hand-over: the RPC service calls the poll's sink with a request; the sink hands it to
the waiting poll and returns only once the response carrying it was passed to the
server. If the poll is already over (timed out, client gone) or its response could not
be sent, the sink raises `DeviceGone` and the RPC service keeps the request for the
device's next session (the next poll) within the call's timeout, so a request is never
dropped silently. One window remains: a client that vanishes after the server took the
response but before it reached the device; a two-way call then ends in 504 for its
caller (never a false success), a one-way call counts as delivered.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response

from iotmesh.api.body import ClientGone
from iotmesh.api.context import ApiContext, MsgspecResponse, context
from iotmesh.api.device_http import TRANSPORT, authenticate
from iotmesh.api.polls import wait_event
from iotmesh.api.problems import problem
from iotmesh.commands.rpc import RpcRequest
from iotmesh.core.errors import DeviceGone
from iotmesh.core.types import Device
from iotmesh.proto.thingsboard import shared_update

router = APIRouter(prefix="/api/v1/{access_token}", tags=["device API"])

Ctx = Annotated[ApiContext, Depends(context)]
TimeoutParam = Annotated[
    int,
    Query(ge=0, description="Longest wait in ms; 0: http.long_poll_default_s."),
]

_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"description": "unknown access token"},
    408: {"description": "nothing came within the timeout; poll again"},
}


def _wait_s(ctx: ApiContext, timeout_ms: int) -> float:
    http = ctx.settings.http
    if timeout_ms == 0:
        return http.long_poll_default_s
    return min(timeout_ms / 1000, http.long_poll_max_s)


def _timed_out(timeout_s: float) -> Response:
    return problem(408, f"nothing for the device within {round(timeout_s * 1000)} ms")


def _gone() -> Response:
    # Nobody reads this: the client closed the connection or stream.
    return Response(status_code=204)


@router.get(
    "/attributes/updates",
    response_class=MsgspecResponse,
    responses={
        200: {"content": {"application/json": {"example": {"targetTemperature": 22}}}},
        **_RESPONSES,
    },
)
async def poll_attributes(
    access_token: str, request: Request, ctx: Ctx, timeout: TimeoutParam = 0
) -> Response:
    """Wait for the next change of the device's shared attributes: the changed values,
    or `{"deleted": [keys]}`."""
    device = await authenticate(ctx, access_token)
    wait_s = _wait_s(ctx, timeout)
    update: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

    async def listener(changed: dict[str, Any], deleted: list[str]) -> None:
        if not update.done():
            update.set_result(shared_update(changed, deleted))

    remove = ctx.attributes.listen_shared(device.id, listener)
    ctx.connectivity.opened(device.id, TRANSPORT)
    try:
        body = await wait_event(update, request.receive, wait_s, ctx.long_polls, "attributes")
    except ClientGone:
        return _gone()
    finally:
        remove()
        ctx.connectivity.closed(device.id, TRANSPORT)
    return _timed_out(wait_s) if body is None else MsgspecResponse(body)


class _HandOverResponse(MsgspecResponse):
    """Answers an RPC poll and tells the waiting sink whether the server took it."""

    def __init__(self, content: Any, sent: asyncio.Future[None]) -> None:
        super().__init__(content)
        self._sent = sent

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        except BaseException:
            if not self._sent.done():
                self._sent.set_exception(DeviceGone("the RPC poll's answer could not be sent"))
            raise
        if not self._sent.done():
            self._sent.set_result(None)


Offer = tuple[RpcRequest, "asyncio.Future[None]"]


@router.get(
    "/rpc",
    response_class=MsgspecResponse,
    responses={
        200: {
            "content": {
                "application/json": {
                    "example": {"id": 1, "method": "setGpio", "params": {"pin": 4}}
                }
            }
        },
        **_RESPONSES,
    },
)
async def poll_rpc(
    access_token: str, request: Request, ctx: Ctx, timeout: TimeoutParam = 0
) -> Response:
    """Wait for the next server-side RPC request: `{"id", "method", "params"}`; reply
    with `POST /api/v1/{token}/rpc/{id}`."""
    device = await authenticate(ctx, access_token)
    wait_s = _wait_s(ctx, timeout)
    loop = asyncio.get_running_loop()
    offer: asyncio.Future[Offer] = loop.create_future()

    async def sink(target: Device, rpc_request: RpcRequest) -> None:
        if offer.done():
            raise DeviceGone("the device's RPC long-poll is over")
        sent: asyncio.Future[None] = loop.create_future()
        offer.set_result((rpc_request, sent))
        await sent  # DeviceGone when the answer could not be sent

    detach = ctx.rpc.attach(device.id, sink)
    ctx.connectivity.opened(device.id, TRANSPORT)
    handed: Offer | None = None
    try:
        handed = await _wait_offer(offer, request, wait_s, ctx)
    except ClientGone:
        return _gone()
    finally:
        detach()
        ctx.connectivity.closed(device.id, TRANSPORT)
        if handed is None:  # timed out, client gone or cancelled: hand nothing over
            _refuse(offer)
    if handed is None:
        return _timed_out(wait_s)
    rpc_request, sent = handed
    body = {"id": rpc_request.id, "method": rpc_request.method, "params": rpc_request.params}
    return _HandOverResponse(body, sent)


async def _wait_offer(
    offer: asyncio.Future[Offer], request: Request, wait_s: float, ctx: ApiContext
) -> Offer | None:
    return await wait_event(offer, request.receive, wait_s, ctx.long_polls, "rpc")


def _refuse(offer: asyncio.Future[Offer]) -> None:
    """Close the poll to its sink; a request it already took goes back to the RPC
    service (which offers it to the device's next session)."""
    if not offer.done():
        offer.cancel()
    elif not offer.cancelled():
        _, sent = offer.result()
        if not sent.done():
            sent.set_exception(DeviceGone("the device closed its RPC long-poll"))
