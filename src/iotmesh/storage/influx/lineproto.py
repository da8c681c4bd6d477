"""InfluxDB line protocol for telemetry, and the data model it writes.

Data model (see docs/storage.md): one measurement, `telemetry`; a point per (entity,
key, ts) in the series `telemetry,entity=<entity>,key=<key>`; its fields say what the
value is. InfluxDB types a field once per measurement and shard, and a key may carry a
long today and a double or a string tomorrow, so each value kind has its own field,
always of the same InfluxDB type:

    kind (iotmesh)  field   InfluxDB type   value
    DOUBLE          v_d     float           the double (finite)
    DOUBLE (±inf,   v_s     string          "inf", "-inf" or "nan": line protocol has no
     nan)                                   non-finite floats
    LONG            v_l     integer         the int64
    BOOL            v_b     boolean         true / false
    STRING          v_s     string          the string
    JSON            v_j     string          the value as compact JSON

and every point has `kind` (integer): the `Kind` number of its value (`NONFINITE` for the
non-finite doubles). Writing a ts again with another kind leaves the old kind's field in
place (InfluxDB merges the fields of a point and has no null), so readers look only at
the field `kind` names, and aggregations filter on `kind`.

Tag values are percent-encoded where line protocol cannot carry them: `%`, `\\` and
control characters (newlines end a line; a trailing backslash escapes the separator),
and the empty string (InfluxDB drops empty tags) is written as `%`. Everything else,
unicode included, is stored as is, so tags stay readable in InfluxDB's own tools.
Line protocol then escapes `,`, `=` and space with a backslash.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import msgspec

from iotmesh.core.errors import PayloadError
from iotmesh.storage.points import Kind, classify
from iotmesh.storage.timeseries import SeriesWrite

MEASUREMENT = "telemetry"

# The `kind` of a non-finite double (stored as a string in v_s).
NONFINITE = 5

# The field holding each kind's value.
FIELD = {
    Kind.DOUBLE: "v_d",
    Kind.LONG: "v_l",
    Kind.BOOL: "v_b",
    Kind.STRING: "v_s",
    Kind.JSON: "v_j",
    NONFINITE: "v_s",
}
VALUE_FIELDS = ("v_d", "v_l", "v_b", "v_s", "v_j")

# InfluxDB stores ns in an int64 and keeps the two extreme values for itself.
MIN_TS_NS = -9223372036854775806
MAX_TS_NS = 9223372036854775806
MIN_TS_MS = -(-MIN_TS_NS // 1_000_000)  # rounded towards zero: still inside
MAX_TS_MS = MAX_TS_NS // 1_000_000

_TAG_UNSAFE = re.compile(r"[%\\\x00-\x1f\x7f]")
_TAG_ESCAPE = str.maketrans({",": r"\,", "=": r"\=", " ": r"\ "})
_PERCENT = re.compile(r"%([0-9A-F]{2})")
_json = msgspec.json.Encoder()


def encode_tag(value: str) -> str:
    """The stored form of a tag value (before line protocol escaping); see the module doc."""
    if not value:
        return "%"
    return _TAG_UNSAFE.sub(lambda m: f"%{ord(m.group()):02X}", value)


def decode_tag(stored: str) -> str:
    """The inverse of `encode_tag`."""
    if stored == "%":
        return ""
    if "%" not in stored:
        return stored
    return _PERCENT.sub(lambda m: chr(int(m.group(1), 16)), stored)


def escape_tag(value: str) -> str:
    """A tag value as it appears in a line: encoded, then `,`, `=` and space escaped."""
    return encode_tag(value).translate(_TAG_ESCAPE)


def escape_string_field(value: str) -> str:
    """A string field value, quoted: `"` and `\\` escaped (newlines are allowed)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def check_ts(ts: int) -> None:
    """Refuse a timestamp InfluxDB cannot store (before the year 1677 or after 2262).

    Raises:
        PayloadError: the timestamp is out of range.
    """
    if not MIN_TS_MS <= ts <= MAX_TS_MS:
        raise PayloadError(
            f"timestamp {ts} ms is outside what InfluxDB stores ({MIN_TS_MS}..{MAX_TS_MS})"
        )


def fields(value: Any) -> str:
    """The field set of one value: `kind=<n>i,<field>=<value>`."""
    kind, stored = classify(value)
    if kind is Kind.DOUBLE:
        if not math.isfinite(stored):
            return f'kind={NONFINITE}i,v_s="{stored!r}"'
        return f"kind={kind.value}i,v_d={stored!r}"
    if kind is Kind.LONG:
        return f"kind={kind.value}i,v_l={stored}i"
    if kind is Kind.BOOL:
        return f"kind={kind.value}i,v_b={'true' if stored else 'false'}"
    if kind is Kind.STRING:
        return f"kind={kind.value}i,v_s={escape_string_field(stored)}"
    try:
        text = _json.encode(stored).decode()
    except (TypeError, msgspec.EncodeError) as exc:
        raise PayloadError(f"value cannot be stored as JSON: {exc}") from exc
    return f"kind={kind.value}i,v_j={escape_string_field(text)}"


def encode_lines(batch: Sequence[SeriesWrite]) -> list[str]:
    """The lines (without newline) of a write batch, timestamps in ms.

    Records of the same (entity, key, ts) within the batch are reduced to the last one
    here, so the last write wins whatever InfluxDB does with duplicates in a request.

    Raises:
        PayloadError: a timestamp is out of InfluxDB's range or a value cannot be encoded.
    """
    last: dict[tuple[str, str, int], Any] = {}
    for series in batch:
        for record in series.records:
            check_ts(record.ts)
            for key, value in record.values.items():
                last[(series.entity_id, key, record.ts)] = value
    lines = []
    tags: dict[tuple[str, str], str] = {}
    for (entity, key, ts), value in last.items():
        prefix = tags.get((entity, key))
        if prefix is None:
            prefix = f"{MEASUREMENT},entity={escape_tag(entity)},key={escape_tag(key)} "
            tags[(entity, key)] = prefix
        lines.append(f"{prefix}{fields(value)} {ts}")
    return lines


def encode_batch(batch: Sequence[SeriesWrite]) -> bytes:
    """The line protocol body of a write batch (see `encode_lines`)."""
    lines = encode_lines(batch)
    return ("\n".join(lines) + "\n").encode() if lines else b""


def bodies(lines: Sequence[str], max_bytes: int) -> list[bytes]:
    """`lines` as request bodies of at most about `max_bytes` each (a line is never cut).

    InfluxDB refuses bodies over its `max-body-size` (25 MB by default), and its docs
    advise batches of a few thousand points; the writer's batches may be larger.
    """
    out: list[bytes] = []
    start, size = 0, 0
    for i, line in enumerate(lines):
        size += len(line) + 1  # characters: a close enough bound for mostly-ASCII lines
        if size >= max_bytes:
            out.append(("\n".join(lines[start : i + 1]) + "\n").encode())
            start, size = i + 1, 0
    if start < len(lines):
        out.append(("\n".join(lines[start:]) + "\n").encode())
    return out


__all__ = [
    "FIELD",
    "MAX_TS_MS",
    "MEASUREMENT",
    "MIN_TS_MS",
    "NONFINITE",
    "VALUE_FIELDS",
    "bodies",
    "decode_tag",
    "encode_batch",
    "encode_lines",
    "encode_tag",
    "escape_string_field",
    "escape_tag",
    "fields",
]
