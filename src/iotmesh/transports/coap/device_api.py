"""The ThingsBoard device API over CoAP: one aiocoap resource that serves every path.

aiocoap hands each request to `render_to_pipe` in a task of its own; the token in the
path (`api/v1/{token}/...`) decides the device, so there is no static resource tree:
`proto/coap.parse_path` names the target and this module does the work, through the
same services the MQTT transport uses (`TelemetryIngest`, `AttributeService`,
`RpcService`, `answer_client_rpc`, `ConnectivityService`).

Order of checks on every request: path (4.04, 4.00 for a bad RPC id), method (4.05),
size (4.13 with Size1: the body, the Size1 the client announced, or the blocks so
far), token (4.01), Content-Format and Accept (4.15, 4.06), the number of Block1
uploads in reassembly (5.03), Block1 reassembly (2.31 Continue per block, 4.08 when a
block is missing), then the body (4.00).

Durability: a telemetry or attribute POST is answered 2.04 only after the commit. A
CON request whose commit takes longer than aiocoap's EMPTY_ACK_DELAY (0.1 s) gets an
empty ACK first, which only stops the client's retransmissions; the 2.04 follows as a
separate response. No room in the pipeline within `coap.enqueue_timeout_s` → 5.03 with
Max-Age (seconds to wait), and nothing of the request is kept.

Observe (RFC 7641): `GET attributes` or `attributes/updates` with Observe 0 answers the
current shared attributes, then one notification per committed change; `GET rpc` with
Observe 0 answers an empty 2.05, then one notification per server-side RPC request.
Notifications are CON, so a device that went away is noticed at the next one (its
observation ends when the retransmissions run out). Observations are bounded per
device and in total; beyond, 4.29 Too Many Requests (RFC 8516) with Max-Age.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import Counter
from collections.abc import Callable
from typing import Any

import msgspec
from aiocoap import Message, Reliable, interfaces
from aiocoap.numbers.codes import Code

from iotmesh.commands.client_rpc import answer_client_rpc
from iotmesh.commands.rpc import RpcRequest, RpcService
from iotmesh.core.clock import now_ms
from iotmesh.core.errors import (
    AuthError,
    DeviceGone,
    IotmeshError,
    NotFound,
    Overloaded,
    PayloadError,
    PayloadTooLarge,
)
from iotmesh.core.settings import CoapSettings
from iotmesh.core.types import AttributeScope, Device
from iotmesh.devicestate import AttributeService, ConnectivityService
from iotmesh.devicestate.attributes import requested_values
from iotmesh.pipeline.ingest import TelemetryIngest
from iotmesh.proto import coap
from iotmesh.proto.thingsboard import (
    attributes_from_json,
    shared_update,
    split_keys,
    telemetry_from_json,
)
from iotmesh.registry.service import DeviceRegistry
from iotmesh.transports.coap.dtls import session_device

log = logging.getLogger(__name__)

TRANSPORT = "coap"
OBSERVE_REFUSED_MAX_AGE_S = 60
_OBSERVE_MASK = 0xFFFFFF  # the Observe option holds 24 bits
_METHODS: dict[coap.Resource, tuple[Code, ...]] = {
    coap.Resource.TELEMETRY: (Code.POST,),
    coap.Resource.ATTRIBUTES: (Code.GET, Code.POST),
    coap.Resource.ATTRIBUTE_UPDATES: (Code.GET,),
    coap.Resource.RPC: (Code.GET, Code.POST),
}


class CoapStats(msgspec.Struct):
    """Counters of the CoAP transport (GET /api/v1/stats → "coap")."""

    requests: int = 0
    telemetry_stored: int = 0
    errors: int = 0
    overloaded: int = 0
    observations_refused: int = 0


class TooManyObservations(IotmeshError):
    """A device (or the server) holds as many observations as it may."""


class DeviceApiSite(interfaces.Resource):  # type: ignore[misc]
    """The root resource of the CoAP server: every request of the device API."""

    def __init__(
        self,
        settings: CoapSettings,
        registry: DeviceRegistry,
        ingest: TelemetryIngest,
        attributes: AttributeService,
        rpc: RpcService,
        connectivity: ConnectivityService,
    ) -> None:
        super().__init__()  # sets up aiocoap's Block1 spool and Block2 cache
        self.settings = settings
        self.registry = registry
        self.ingest = ingest
        self.attributes = attributes
        self.rpc = rpc
        self.connectivity = connectivity
        self.stats = CoapStats()
        self.observing: Counter[str] = Counter()  # device id → observations held
        self.observations: set[asyncio.Task[Any]] = set()
        self.inflight = 0  # requests being handled, observations not counted
        self.draining = False
        self._limits = {"maxPayloadSize": settings.max_payload_bytes}

    # aiocoap's abstract interface; render_to_pipe below replaces both.
    async def render(self, request: Message) -> Message:
        raise NotImplementedError

    async def needs_blockwise_assembly(self, request: Message) -> bool:
        return True

    async def render_to_pipe(self, pipe: Any) -> None:
        """Answer one request (or hold an observation open until the client leaves)."""
        request = pipe.request
        self.stats.requests += 1
        self.inflight += 1
        try:
            if self.draining:
                raise Overloaded("the server is shutting down", retry_after=5.0)
            session = getattr(request.remote, "scheme", "coap") == "coaps"
            target = coap.parse_path(request.opt.uri_path, session=session)
            if request.code not in _METHODS[target.resource]:
                pipe.add_response(Message(code=Code.METHOD_NOT_ALLOWED), is_last=True)
                return
            self._check_size(request)
            if target.token is None:
                device = await session_device(self.registry, request.remote.authenticated_claims)
            else:
                device = await self.registry.authenticate(target.token)
            self.connectivity.activity(device.id, TRANSPORT)
            if request.code == Code.GET and request.opt.observe == 0:
                self.inflight -= 1  # an observation is not in flight: it waits
                try:
                    await self._observe(pipe, request, device, target)
                finally:
                    self.inflight += 1
                return
            coap.request_format(request.opt.content_format)  # 4.15 before the blocks
            self._check_uploads(request)
            # Raises aiocoap's ContinueException (2.31) or IncompleteException (4.08).
            whole = self._block1.feed_and_take(request)
            response = await self._respond(whole, device, target)
            response.opt.block1 = whole.opt.block1
            pipe.add_response(response, is_last=True)
        except IotmeshError as exc:
            pipe.add_response(self.error_response(exc), is_last=True)
        finally:
            self.inflight -= 1

    def _check_size(self, request: Message) -> None:
        limit = self.settings.max_payload_bytes
        size = len(request.payload)
        block1 = request.opt.block1
        if block1 is not None:
            size += block1.block_number * block1.size
        announced = request.opt.size1
        if announced is not None and announced > limit:
            raise PayloadTooLarge(announced, limit)
        if size > limit:
            raise PayloadTooLarge(size, limit)

    def _check_uploads(self, request: Message) -> None:
        """Bound the Block1 uploads held for reassembly (memory: each may grow to the
        payload limit, and aiocoap keeps an unfinished one for 93 s)."""
        block1 = request.opt.block1
        if block1 is None or block1.block_number != 0 or not block1.more:
            return
        # aiocoap's Block1Spool keeps them in a TimeoutDict; neither counts publicly.
        held = len(self._block1._assemblies._items)
        if held >= self.settings.max_blockwise_uploads:
            raise Overloaded(f"{held} block-wise uploads are being received", retry_after=10)

    async def _respond(self, request: Message, device: Device, target: coap.Target) -> Message:
        """The answer, or the block of it that Block2 asks for.

        aiocoap's Block2 cache computes a cache key from the options of every request;
        only requests that ask for a later block, or answers too large for one
        datagram, need it, so the common small answer skips it.
        """
        block2 = request.opt.block2
        if block2 is not None and block2.block_number > 0:
            return await self._block2.extract_or_insert(request, _never)
        response = await self._handle(request, device, target)
        size = len(response.payload)
        if size <= request.remote.maximum_payload_size and (block2 is None or size <= block2.size):
            return response

        async def built() -> Message:
            return response

        return await self._block2.extract_or_insert(request, built)

    async def _handle(self, request: Message, device: Device, target: coap.Target) -> Message:
        """The answer to a complete (reassembled) request that is not an observation."""
        resource = target.resource
        body = request.payload
        if request.code == Code.GET:  # without Observe (e.g. ending an observation)
            fmt = coap.answer_format(request.opt.accept, None)
            if target.rpc_id is not None:
                raise NotFound("GET rpc/{id} is not part of the API")
            if resource is coap.Resource.RPC:
                return Message(code=Code.CONTENT)  # as the first answer of an observation
            if resource is coap.Resource.ATTRIBUTE_UPDATES:
                shared = await self.attributes.values(device.id, AttributeScope.SHARED)
                return _content(shared, fmt)
            query = coap.parse_query(request.opt.uri_query)
            answer = await requested_values(
                self.attributes,
                device.id,
                split_keys(query.get("clientKeys")),
                split_keys(query.get("sharedKeys")),
            )
            return _content(answer, fmt)
        fmt_in = coap.request_format(request.opt.content_format)
        if resource is coap.Resource.TELEMETRY:
            records = telemetry_from_json(coap.decode_payload(body, fmt_in), now_ms())
            await self.ingest.submit(device.id, records)
            self.stats.telemetry_stored += 1
            return Message(code=Code.CHANGED)
        if resource is coap.Resource.ATTRIBUTES:
            values = attributes_from_json(coap.decode_payload(body, fmt_in))
            await self.attributes.save(device.id, AttributeScope.CLIENT, values)
            return Message(code=Code.CHANGED)
        if target.rpc_id is not None:
            self.rpc.reply(device.id, target.rpc_id, _reply_payload(body, fmt_in))
            await self.rpc.flushed()  # 2.04 once the reply is stored
            return Message(code=Code.CHANGED)
        fmt_out = coap.answer_format(request.opt.accept, request.opt.content_format)
        doc = coap.decode_payload(body, fmt_in)
        method = doc.get("method") if isinstance(doc, dict) else None
        params = doc.get("params") if isinstance(doc, dict) else None
        if not isinstance(method, str) or not method:
            raise PayloadError('client-side RPC needs {"method": "...", "params": ...}')
        return _content(answer_client_rpc(method, params, self._limits), fmt_out)

    # -- observations -------------------------------------------------------------------

    async def _observe(
        self, pipe: Any, request: Message, device: Device, target: coap.Target
    ) -> None:
        """Hold one observation until the client cancels it or stops answering."""
        if target.resource is coap.Resource.TELEMETRY or target.rpc_id is not None:
            raise NotFound("only attributes and rpc can be observed")
        fmt = coap.answer_format(request.opt.accept, None)
        self._admit(device)
        task = asyncio.current_task()
        assert task is not None
        self.observing[device.id] += 1
        self.observations.add(task)
        self.connectivity.opened(device.id, TRANSPORT)
        sequence = 0
        alive = True

        def notify(value: Any) -> None:
            nonlocal sequence
            sequence = (sequence + 1) & _OBSERVE_MASK
            message = Message(transport_tuning=Reliable, code=Code.CONTENT, observe=sequence)
            _fill(message, value, fmt)
            pipe.add_response(message, is_last=False)

        undo: Callable[[], None]
        try:
            if target.resource is coap.Resource.RPC:

                async def deliver(_: Device, rpc_request: RpcRequest) -> None:
                    if not alive:
                        raise DeviceGone("the CoAP observation of RPC requests ended")
                    notify(
                        {"id": rpc_request.id, "method": rpc_request.method,
                         "params": rpc_request.params}
                    )  # fmt: skip

                first: Message = Message(code=Code.CONTENT, observe=0)
                undo = self.rpc.attach(device.id, deliver)
            else:

                async def push(changed: dict[str, Any], deleted: list[str]) -> None:
                    if alive:
                        notify(shared_update(changed, deleted))

                undo = self.attributes.listen_shared(device.id, push)
                current = await self.attributes.values(device.id, AttributeScope.SHARED)
                first = Message(code=Code.CONTENT, observe=0)
                _fill(first, current, fmt)
            try:
                pipe.add_response(first, is_last=False)
                await asyncio.Event().wait()  # until aiocoap cancels us: the client left
            finally:
                alive = False
                undo()
        finally:
            self.observations.discard(task)
            self.observing[device.id] -= 1
            if self.observing[device.id] <= 0:
                del self.observing[device.id]
            self.connectivity.closed(device.id, TRANSPORT)

    def _admit(self, device: Device) -> None:
        """Refuse an observation beyond the per-device or total limit."""
        s = self.settings
        if self.observing[device.id] >= s.max_observations_per_device:
            raise TooManyObservations(
                f"device holds {s.max_observations_per_device} observations already"
            )
        if len(self.observations) >= s.max_observations:
            raise TooManyObservations(f"the server holds {s.max_observations} observations")

    def stop_observations(self) -> None:
        """Cancel every observation (at shutdown)."""
        for task in list(self.observations):
            task.cancel()

    # -- errors ---------------------------------------------------------------------------

    def error_response(self, exc: IotmeshError) -> Message:
        """The one place iotmesh errors become CoAP response codes."""
        self.stats.errors += 1
        diagnostic = str(exc).encode("utf-8", "replace")[:200]
        if isinstance(exc, PayloadTooLarge):
            return Message(code=Code.REQUEST_ENTITY_TOO_LARGE, size1=exc.limit, payload=diagnostic)
        if isinstance(exc, coap.UnsupportedFormat):
            return Message(code=Code.UNSUPPORTED_CONTENT_FORMAT, payload=diagnostic)
        if isinstance(exc, coap.NotAcceptable):
            return Message(code=Code.NOT_ACCEPTABLE, payload=diagnostic)
        if isinstance(exc, PayloadError):
            return Message(code=Code.BAD_REQUEST, payload=diagnostic)
        if isinstance(exc, AuthError):
            return Message(code=Code.UNAUTHORIZED, payload=diagnostic)
        if isinstance(exc, NotFound):
            return Message(code=Code.NOT_FOUND, payload=diagnostic)
        if isinstance(exc, TooManyObservations):
            self.stats.observations_refused += 1
            return Message(
                code=Code.TOO_MANY_REQUESTS,
                max_age=OBSERVE_REFUSED_MAX_AGE_S,
                payload=diagnostic,
            )
        if isinstance(exc, Overloaded):
            self.stats.overloaded += 1
            return Message(
                code=Code.SERVICE_UNAVAILABLE,
                max_age=max(1, math.ceil(exc.retry_after)),
                payload=diagnostic,
            )
        log.warning("coap request failed: %s", exc)
        return Message(code=Code.INTERNAL_SERVER_ERROR, payload=diagnostic)


async def _never() -> Message:
    """The builder for a later Block2 block: aiocoap answers from its cache (or 4.08)."""
    raise AssertionError("a later block is never rendered anew")


def _fill(message: Message, value: Any, fmt: int) -> None:
    message.payload = coap.encode_payload(value, fmt)
    message.opt.content_format = fmt


def _content(value: Any, fmt: int) -> Message:
    message = Message(code=Code.CONTENT)
    _fill(message, value, fmt)
    return message


def _reply_payload(body: bytes, fmt: int) -> Any:
    """An RPC reply: JSON or CBOR data; a JSON body that does not parse is kept as text,
    as the MQTT transport does."""
    if fmt == coap.CBOR:
        return coap.decode_payload(body, fmt)
    try:
        return coap.decode_payload(body, fmt)
    except PayloadError:
        return body.decode("utf-8", "replace")
