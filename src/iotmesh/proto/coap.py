"""The ThingsBoard device API over CoAP, sans-IO: which resource a request names, and
the payload formats (Content-Format) a device may use.

Paths (RFC 7252 Uri-Path options, one segment each):

    api/v1/{token}/telemetry            POST: telemetry
    api/v1/{token}/attributes           POST: client attributes; GET (+Observe): values
    api/v1/{token}/attributes/updates   GET + Observe: shared attribute changes
    api/v1/{token}/rpc                  GET + Observe: server-side RPC; POST: client-side RPC
    api/v1/{token}/rpc/{id}             POST: reply to server-side RPC request {id}

Payloads: JSON (Content-Format 50, also accepted when the option is absent or is
text/plain 0, as ThingsBoard devices often send it) or CBOR (60). A CBOR document is
turned into the JSON data model before the ThingsBoard rules of `thingsboard.py` apply,
so both formats store exactly the same values: map keys must be text, values numbers,
booleans, text, arrays or maps; byte strings, tags, undefined and non-finite floats are
refused. Anything else raises `PayloadError` (the transport answers 4.00).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from enum import Enum
from typing import Any

import cbor2
import msgspec

from iotmesh.core.errors import NotFound, PayloadError
from iotmesh.proto.thingsboard import MAX_JSON_DEPTH, decode_json

TEXT_PLAIN = 0
JSON = 50
CBOR = 60
SUPPORTED_FORMATS = (JSON, CBOR)
"""Content-Formats of answers; requests may also be text/plain (read as JSON)."""


class Resource(Enum):
    """A resource of the device API."""

    TELEMETRY = "telemetry"
    ATTRIBUTES = "attributes"
    ATTRIBUTE_UPDATES = "attributes/updates"
    RPC = "rpc"


class Target(msgspec.Struct, frozen=True):
    """What a request path names: the device's token (None: the path has none, the
    DTLS session says who it is), the resource, an RPC id."""

    token: str | None
    resource: Resource
    rpc_id: int | None = None


def parse_path(segments: Sequence[str], *, session: bool = False) -> Target:
    """The target of a request's Uri-Path segments.

    With `session` (a DTLS session authenticated the device) the path may leave the
    token out (`api/v1/telemetry`); a third segment that names a resource is read so.

    Raises:
        NotFound: the path is not part of the device API (4.04).
        PayloadError: `rpc/{id}` with an id that is not a number (4.00).
    """
    if len(segments) < 3 or segments[0] != "api" or segments[1] != "v1":
        raise NotFound("not a device API path (expected api/v1/{token}/...)")
    if session and segments[2] in _FIRST_SEGMENTS:
        return _resource(None, tuple(segments[2:]))
    if len(segments) < 4 or not segments[2]:
        raise NotFound("not a device API path (expected api/v1/{token}/...)")
    return _resource(segments[2], tuple(segments[3:]))


_FIRST_SEGMENTS = frozenset({"telemetry", "attributes", "rpc"})


def _resource(token: str | None, rest: tuple[str, ...]) -> Target:
    if rest == ("telemetry",):
        return Target(token, Resource.TELEMETRY)
    if rest == ("attributes",):
        return Target(token, Resource.ATTRIBUTES)
    if rest == ("attributes", "updates"):
        return Target(token, Resource.ATTRIBUTE_UPDATES)
    if rest == ("rpc",):
        return Target(token, Resource.RPC)
    if len(rest) == 2 and rest[0] == "rpc":
        text = rest[1]
        if not (text.isascii() and text.isdigit()) or len(text) > 18:
            raise PayloadError(f"RPC request id {text!r} is not a number")
        return Target(token, Resource.RPC, int(text))
    raise NotFound(f"no device API resource {'/'.join(rest)!r}")


def parse_query(options: Sequence[str]) -> dict[str, str]:
    """Uri-Query options (`clientKeys=a,b`) as a dict; a later key wins, no `=` → ""."""
    query: dict[str, str] = {}
    for option in options:
        key, _, value = option.partition("=")
        query[key] = value
    return query


def request_format(content_format: int | None) -> int:
    """The format a request body is in: JSON unless it says CBOR.

    Raises:
        PayloadError: a Content-Format other than JSON, CBOR or text/plain (4.15).
    """
    if content_format is None or content_format in (JSON, TEXT_PLAIN):
        return JSON
    if content_format == CBOR:
        return CBOR
    raise UnsupportedFormat(content_format)


def answer_format(accept: int | None, content_format: int | None) -> int:
    """The format of an answer: Accept when given, else that of the request, else JSON.

    Raises:
        NotAcceptable: Accept names a format we cannot produce (4.06).
    """
    if accept is not None:
        if accept in SUPPORTED_FORMATS:
            return accept
        if accept == TEXT_PLAIN:
            return JSON
        raise NotAcceptable(accept)
    return CBOR if content_format == CBOR else JSON


class UnsupportedFormat(PayloadError):
    """The request body is in a Content-Format the device API does not read."""

    def __init__(self, content_format: int) -> None:
        super().__init__(
            f"Content-Format {content_format} is not supported (use 50 JSON or 60 CBOR)"
        )
        self.content_format = content_format


class NotAcceptable(PayloadError):
    """The request's Accept option names a format the device API cannot produce."""

    def __init__(self, accept: int) -> None:
        super().__init__(f"cannot answer in Content-Format {accept} (50 JSON or 60 CBOR)")
        self.accept = accept


def decode_payload(body: bytes, fmt: int) -> Any:
    """Decode a request body of format `fmt` (JSON or CBOR) into JSON data.

    Raises:
        PayloadError: malformed, or CBOR that has no JSON equivalent.
    """
    if fmt == JSON:
        return decode_json(body)
    stream = io.BytesIO(body)
    try:
        doc = cbor2.CBORDecoder(stream).decode()
    except RecursionError:
        raise PayloadError(f"CBOR nested deeper than {MAX_JSON_DEPTH} levels") from None
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError) as exc:
        raise PayloadError(f"malformed CBOR: {exc}") from None
    if stream.tell() != len(body):
        raise PayloadError("malformed CBOR: data after the end of the document")
    return _json_model(doc)


def _json_model(doc: Any) -> Any:
    """Check that a decoded CBOR value is plain JSON data (iteratively, depth-bounded)."""
    stack: list[tuple[Any, int]] = [(doc, 0)]
    while stack:
        node, depth = stack.pop()
        if node is None or isinstance(node, bool | int | str):
            continue
        if isinstance(node, float):
            if not math.isfinite(node):
                raise PayloadError("CBOR: NaN and infinite numbers are not allowed")
            continue
        if depth >= MAX_JSON_DEPTH:
            raise PayloadError(f"CBOR nested deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(node, dict):
            for key, value in node.items():
                if not isinstance(key, str):
                    raise PayloadError("CBOR: map keys must be text strings")
                stack.append((value, depth + 1))
        elif isinstance(node, list):
            stack.extend((value, depth + 1) for value in node)
        else:
            raise PayloadError(f"CBOR: a {type(node).__name__} has no JSON equivalent")
    return doc


_json = msgspec.json.Encoder()


def encode_payload(value: Any, fmt: int) -> bytes:
    """Encode an answer (JSON data) in format `fmt` (JSON or CBOR)."""
    if fmt == CBOR:
        return cbor2.dumps(value)
    return _json.encode(value)
