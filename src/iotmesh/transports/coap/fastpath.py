"""The telemetry fast path: plain `POST api/v1/{token}/telemetry` without going
through aiocoap's request machinery.

Why: aiocoap spends most of a request's CPU in its generic layers (a message object,
an endpoint address, a dedup entry and an empty-ACK timer per message, a pipe, a task
and its name). Telemetry uploads are nearly all the traffic and all alike, so they are
taken off the socket before aiocoap sees them, the way the MQTT transport batches its
hot path: decode with `proto/coap_wire`, authenticate from the login cache, parse,
`TelemetryIngest.submit_nowait`, and the 2.04 leaves from the commit callback.

Only the simple case is taken; aiocoap gets everything else unchanged: any other
method or path, Block1/Block2, Observe, No-Response or any option not listed in
`_SIMPLE_OPTIONS`, a token not in the login cache, a payload that does not parse
(aiocoap answers 4.00 with the reason), over the size limit, a bus without room at
once (aiocoap's path waits, then 5.03), or a server shutting down.

Acknowledgement: a CON request is answered by a piggybacked ACK carrying 2.04, sent
after the commit; there is no empty ACK first. A commit takes well under the 2 s
ACK_TIMEOUT; should it take longer, the client retransmits and the duplicate is
recognised (not stored twice) and answered once the commit is done. NON requests get
a NON 2.04.

Deduplication (RFC 7252 §4.5) keeps (client, message id) for `DEDUP_SECONDS`
(EXCHANGE_LIFETIME would be 247 s; retransmissions end after MAX_TRANSMIT_SPAN, 45 s),
at most `DEDUP_MAX` entries: a duplicate of a request in progress is dropped, of a
finished one re-answered from the entry. A POST handed to aiocoap is remembered too,
so that its retransmission goes to aiocoap as well (which recognises it) rather than
being taken, and stored again, here once its token is in the cache.
"""

from __future__ import annotations

import collections
import itertools
import socket
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from iotmesh.core.clock import now_ms
from iotmesh.core.errors import PayloadError
from iotmesh.proto import coap, coap_wire
from iotmesh.proto.coap_wire import ACK, CHANGED, CON, INTERNAL_SERVER_ERROR, NON
from iotmesh.proto.thingsboard import telemetry_from_json

if TYPE_CHECKING:
    from iotmesh.transports.coap.device_api import DeviceApiSite

DEDUP_SECONDS = 60.0
DEDUP_MAX = 100_000
_SIMPLE_OPTIONS = frozenset(
    {coap_wire.URI_HOST, coap_wire.URI_PORT, coap_wire.URI_PATH, coap_wire.CONTENT_FORMAT,
     coap_wire.ACCEPT, coap_wire.SIZE1}
)  # fmt: skip
_TELEMETRY = b"telemetry"

Address = Any  # a socket address tuple from recvmsg
Send = Callable[[bytes, list[tuple[int, int, bytes]], Address], None]


class FastTelemetry:
    """Takes simple telemetry POSTs off the socket; see the module docstring."""

    def __init__(self, site: DeviceApiSite, registry: Any) -> None:
        self.site = site
        self.registry = registry
        self.limit = site.settings.max_payload_bytes
        # (address, message id) -> [expiry, answer or None while committing, whether
        # aiocoap got the message]
        self.recent: collections.OrderedDict[tuple[Address, int], list[Any]] = (
            collections.OrderedDict()
        )
        self._mids = itertools.count(int(time.monotonic() * 1000))
        self.taken = 0

    def handle(self, data: bytes, ancdata: list[Any], address: Address, send: Send) -> bool:
        """Answer `data` if it is a simple telemetry upload; False: give it to aiocoap."""
        # Cheap checks on the raw bytes first: most non-telemetry leaves here.
        if len(data) < 4 or data[1] != coap_wire.POST or (data[0] >> 4) & 3 > NON:
            return False
        site = self.site
        if site.draining:
            return False
        mtype, mid = (data[0] >> 4) & 3, int.from_bytes(data[2:4], "big")
        key = (address, mid)
        entry = self.recent.get(key)
        if entry is not None:
            if entry[2]:
                return False  # aiocoap had the original: its deduplication answers
            if entry[1] is not None:
                send(entry[1], ancdata, address)  # a retransmission: answer again
            return True  # still committing: the answer goes out when it is done
        if self._take(data, mtype, mid, key, ancdata, address, send):
            return True
        # Remembered, so that a retransmission also goes to aiocoap (which knows it),
        # even if by then the token is cached and it would be simple enough for us.
        self._remember(key, to_aiocoap=True)
        return False

    def _take(
        self,
        data: bytes,
        mtype: int,
        mid: int,
        key: tuple[Address, int],
        ancdata: list[Any],
        address: Address,
        send: Send,
    ) -> bool:
        site = self.site
        try:
            message = coap_wire.decode(data)
        except PayloadError:
            return False
        path: list[bytes] = []
        content_format = None
        for number, value in message.options:
            if number not in _SIMPLE_OPTIONS:
                return False
            if number == coap_wire.URI_PATH:
                path.append(value)
            elif number == coap_wire.CONTENT_FORMAT:
                content_format = coap_wire.uint(value)
            elif number == coap_wire.SIZE1 and coap_wire.uint(value) > self.limit:
                return False
        if (
            len(path) != 4
            or path[0] != b"api"
            or path[1] != b"v1"
            or path[3] != _TELEMETRY
            or len(message.payload) > self.limit
            or content_format not in (None, coap.JSON, coap.TEXT_PLAIN, coap.CBOR)
        ):
            return False
        device = self.registry.cached(path[2].decode("utf-8", "replace"))
        if device is None:
            return False
        try:
            fmt = coap.request_format(content_format)
            records = telemetry_from_json(coap.decode_payload(message.payload, fmt), now_ms())
        except PayloadError:
            return False
        self._remember(key, to_aiocoap=False)
        done = partial(self._done, key, mtype, mid, message.token, ancdata, address, send)
        if not site.ingest.submit_nowait(device.id, records, done):
            del self.recent[key]
            return False
        site.inflight += 1
        site.stats.requests += 1
        site.connectivity.activity(device.id, "coap")
        self.taken += 1
        return True

    def _remember(self, key: tuple[Address, int], *, to_aiocoap: bool) -> None:
        recent = self.recent
        now = time.monotonic()
        recent[key] = [now + DEDUP_SECONDS, None, to_aiocoap]
        while recent:
            oldest = next(iter(recent.values()))
            if oldest[0] > now and len(recent) <= DEDUP_MAX:
                break
            recent.popitem(last=False)

    def _done(
        self,
        key: tuple[Address, int],
        mtype: int,
        mid: int,
        token: bytes,
        ancdata: list[Any],
        address: Address,
        send: Send,
        error: BaseException | None,
    ) -> None:
        """The commit finished (or failed): answer, and keep the answer for duplicates."""
        site = self.site
        site.inflight -= 1
        if error is None:
            site.stats.telemetry_stored += 1
            code, payload = CHANGED, b""
        else:
            site.stats.errors += 1
            code, payload = INTERNAL_SERVER_ERROR, str(error).encode("utf-8", "replace")[:200]
        if mtype == CON:
            answer = coap_wire.encode(ACK, code, mid, token, payload=payload)
        else:
            answer = coap_wire.encode(NON, code, next(self._mids) & 0xFFFF, token, payload=payload)
        entry = self.recent.get(key)
        if entry is not None:
            entry[1] = answer
        send(answer, ancdata, address)


def reply_ancdata(ancdata: list[Any]) -> list[tuple[int, int, bytes]]:
    """The IPV6_PKTINFO of a received datagram, to answer from the address it came to."""
    return [
        (level, kind, data)
        for level, kind, data in ancdata
        if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO
    ]
