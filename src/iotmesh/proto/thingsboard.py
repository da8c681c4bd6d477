"""The ThingsBoard device payload forms, shared by the MQTT, CoAP and HTTP transports.

Telemetry accepts, exactly as ThingsBoard does:

    {"temperature": 21.5, "on": true}                       values at server time
    {"ts": 1700000000000, "values": {"temperature": 21.5}}  values at a device time
    [ <either form>, ... ]                                   several entries

Rules: keys are non-empty strings of at most 255 characters; values are numbers,
booleans, strings or JSON objects/arrays nested at most 32 deep (null is refused); `ts`
is an integer number of Unix milliseconds between 0 and year 9999. Integers beyond the
signed 64-bit range become doubles, as storage and the bus hold 64-bit longs.
Anything else raises `PayloadError` with a `detail` that names what is wrong and
where, so a device author can fix it.
"""

from __future__ import annotations

from typing import Any

import msgspec

from iotmesh.core.errors import PayloadError
from iotmesh.core.types import TsRecord

MAX_KEY_LENGTH = 255
MAX_TS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z
MAX_JSON_DEPTH = 32
_LONG_MIN, _LONG_MAX = -(2**63), 2**63 - 1


def decode_json(body: bytes) -> Any:
    """Decode a JSON document, turning decoder errors into `PayloadError`."""
    try:
        return msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise PayloadError(f"malformed JSON: {exc}") from None
    except UnicodeDecodeError:
        raise PayloadError("malformed JSON: not valid UTF-8") from None
    except RecursionError:
        raise PayloadError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels") from None


def _fit_long(value: int) -> int | float:
    return value if _LONG_MIN <= value <= _LONG_MAX else float(value)


def _fit_json(value: Any, where: str) -> Any:
    """Check the depth of a JSON value and make its integers fit 64 bits (in place)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise PayloadError(f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, child in items:
            if type(child) is int:
                node[key] = _fit_long(child)
            elif isinstance(child, dict | list):
                stack.append((child, depth + 1))
    return value


def _values(obj: dict[Any, Any], where: str) -> dict[str, Any]:
    if not obj:
        raise PayloadError(f"{where}: no values")
    for key, value in obj.items():
        if not key or len(key) > MAX_KEY_LENGTH:
            raise PayloadError(f"{where}: keys must be 1 to {MAX_KEY_LENGTH} characters")
        if value is None:
            raise PayloadError(f"{where}: value of {key!r} is null")
        if type(value) is int:
            obj[key] = _fit_long(value)
        elif isinstance(value, dict | list):
            _fit_json(value, f"{where}: value of {key!r}")
    return obj


def _entry(obj: Any, now: int, where: str) -> TsRecord:
    if not isinstance(obj, dict):
        raise PayloadError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "ts" in obj and "values" in obj:
        ts = obj["ts"]
        if type(ts) is not int or not 0 <= ts <= MAX_TS:
            raise PayloadError(f"{where}: 'ts' must be an integer of Unix milliseconds")
        values = obj["values"]
        if not isinstance(values, dict):
            raise PayloadError(f"{where}: 'values' must be a JSON object")
        return TsRecord(ts, _values(values, where))
    return TsRecord(now, _values(obj, where))


def parse_telemetry(body: bytes, now: int) -> list[TsRecord]:
    """Parse a telemetry upload into records.

    Args:
        body: the payload bytes (UTF-8 JSON).
        now: server time in Unix ms, used for entries without `ts`.

    Raises:
        PayloadError: malformed JSON or a payload that breaks the rules above.
    """
    return telemetry_from_json(decode_json(body), now)


def telemetry_from_json(doc: Any, now: int) -> list[TsRecord]:
    """Records from an already decoded telemetry document (e.g. one device's part of a
    gateway message). Raises `PayloadError` as `parse_telemetry`."""
    if isinstance(doc, list):
        if not doc:
            raise PayloadError("payload: empty array")
        return [_entry(item, now, f"payload[{i}]") for i, item in enumerate(doc)]
    return [_entry(doc, now, "payload")]


def attributes_from_json(doc: Any, where: str = "payload") -> dict[str, Any]:
    """Attribute values from a decoded `{"key": value, ...}` document.

    Raises:
        PayloadError: not an object, empty, null values, bad keys.
    """
    if not isinstance(doc, dict):
        raise PayloadError(f"{where}: attributes must be a JSON object")
    return _values(doc, where)


def split_keys(value: Any) -> list[str] | None:
    """ThingsBoard key lists: "a,b,c" (or a JSON array) → ["a", "b", "c"]; None if absent."""
    if value is None:
        return None
    if isinstance(value, list):
        return [str(k) for k in value if str(k)]
    return [k.strip() for k in str(value).split(",") if k.strip()]


def shared_update(changed: dict[str, Any], deleted: list[str]) -> dict[str, Any]:
    """The body of a shared-attribute push to a device (MQTT publish, HTTP long-poll
    answer): the changed values, or the deleted keys under "deleted", as ThingsBoard."""
    return changed if not deleted else {"deleted": deleted}
