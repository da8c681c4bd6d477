"""parse_telemetry: the three ThingsBoard telemetry forms and what it refuses."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from iotmesh.core.errors import PayloadError
from iotmesh.core.types import TelemetryMessage, TsRecord
from iotmesh.pipeline.stages import encode_message
from iotmesh.proto.thingsboard import MAX_KEY_LENGTH, MAX_TS, parse_telemetry

NOW = 1_700_000_000_000


def typed(value: Any) -> Any:
    """`value` with every scalar tagged by its type, so 1, 1.0 and True compare unequal."""
    if isinstance(value, dict):
        return {k: typed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [typed(v) for v in value]
    return (type(value).__name__, value)


def as_tuples(records: list[TsRecord]) -> list[tuple[int, Any]]:
    return [(r.ts, typed(r.values)) for r in records]


def parse(doc: Any) -> list[TsRecord]:
    return parse_telemetry(json.dumps(doc).encode(), NOW)


# --- the three forms ------------------------------------------------------------------


def test_plain_object_is_stored_at_server_time() -> None:
    records = parse_telemetry(b'{"temperature": 21.5, "on": true}', NOW)
    assert as_tuples(records) == as_tuples([TsRecord(NOW, {"temperature": 21.5, "on": True})])


def test_ts_and_values_object_is_stored_at_device_time() -> None:
    records = parse_telemetry(b'{"ts": 1451649600512, "values": {"temperature": 42}}', NOW)
    assert as_tuples(records) == as_tuples([TsRecord(1451649600512, {"temperature": 42})])


def test_array_mixes_both_forms_in_order() -> None:
    body = b'[{"ts": 1000, "values": {"a": 1}}, {"b": 2}, {"ts": 500, "values": {"a": 3}}]'
    records = parse_telemetry(body, NOW)
    assert as_tuples(records) == as_tuples(
        [TsRecord(1000, {"a": 1}), TsRecord(NOW, {"b": 2}), TsRecord(500, {"a": 3})]
    )


def test_value_types_are_kept() -> None:
    body = (
        b'{"long": 42, "double": 42.0, "neg": -7, "bool": false, "str": "42",'
        b' "json": {"x": [1, 2.5, null]}, "list": [true, "a"]}'
    )
    [record] = parse_telemetry(body, NOW)
    assert typed(record.values) == typed(
        {
            "long": 42,
            "double": 42.0,
            "neg": -7,
            "bool": False,
            "str": "42",
            "json": {"x": [1, 2.5, None]},
            "list": [True, "a"],
        }
    )


def test_ts_bounds_are_inclusive() -> None:
    assert parse({"ts": 0, "values": {"a": 1}})[0].ts == 0
    assert parse({"ts": MAX_TS, "values": {"a": 1}})[0].ts == MAX_TS


def test_longest_key_is_accepted() -> None:
    key = "k" * MAX_KEY_LENGTH
    assert list(parse({key: 1})[0].values) == [key]


def test_object_with_only_ts_is_plain_values() -> None:
    # Without "values" a "ts" key is an ordinary telemetry key, as in ThingsBoard.
    assert as_tuples(parse({"ts": 5, "a": 1})) == as_tuples([TsRecord(NOW, {"ts": 5, "a": 1})])


# --- what is refused, and that the message says why ------------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        pytest.param(b'{"a": 1', "malformed JSON", id="truncated"),
        pytest.param(b"{'a': 1}", "malformed JSON", id="single-quotes"),
        pytest.param(b"", "malformed JSON", id="empty-body"),
        pytest.param(b"{}", "payload: no values", id="empty-object"),
        pytest.param(b"[]", "payload: empty array", id="empty-array"),
        pytest.param(b'{"a": null}', "value of 'a' is null", id="null-value"),
        pytest.param(b'{"ts": -1, "values": {"a": 1}}', "'ts' must be an integer", id="ts-neg"),
        pytest.param(b'{"ts": 1.5, "values": {"a": 1}}', "'ts' must be an integer", id="ts-float"),
        pytest.param(b'{"ts": 1.0, "values": {"a": 1}}', "'ts' must be an integer", id="ts-1.0"),
        pytest.param(b'{"ts": "1", "values": {"a": 1}}', "'ts' must be an integer", id="ts-str"),
        pytest.param(b'{"ts": true, "values": {"a": 1}}', "'ts' must be an integer", id="ts-bool"),
        pytest.param(
            f'{{"ts": {MAX_TS + 1}, "values": {{"a": 1}}}}'.encode(),
            "'ts' must be an integer",
            id="ts-past-9999",
        ),
        pytest.param(
            b'{"ts": 1, "values": [1]}', "'values' must be a JSON object", id="values-list"
        ),
        pytest.param(b'{"ts": 1, "values": 3}', "'values' must be a JSON object", id="values-int"),
        pytest.param(b'{"ts": 1, "values": {}}', "payload: no values", id="values-empty"),
        pytest.param(b"42", "expected a JSON object, got int", id="scalar-int"),
        pytest.param(b'"hello"', "expected a JSON object, got str", id="scalar-str"),
        pytest.param(b"null", "expected a JSON object", id="scalar-null"),
        pytest.param(b"[[]]", "payload[0]: expected a JSON object, got list", id="nested-array"),
        pytest.param(b'{"": 1}', f"keys must be 1 to {MAX_KEY_LENGTH}", id="empty-key"),
        pytest.param(
            f'{{"{"k" * (MAX_KEY_LENGTH + 1)}": 1}}'.encode(),
            f"keys must be 1 to {MAX_KEY_LENGTH} characters",
            id="key-too-long",
        ),
        pytest.param(
            b'[{"a": 1}, {"b": null}]', "payload[1]: value of 'b' is null", id="where-in-array"
        ),
    ],
)
def test_bad_payload_raises_payload_error_naming_the_problem(body: bytes, message: str) -> None:
    with pytest.raises(PayloadError) as info:
        parse_telemetry(body, NOW)
    assert message in str(info.value)


def test_invalid_utf8_is_payload_error() -> None:
    with pytest.raises(PayloadError):
        parse_telemetry(b'{"t": "\xff"}', NOW)


def test_deeply_nested_json_is_payload_error() -> None:
    depth = 5000
    with pytest.raises(PayloadError):
        parse_telemetry(b'{"t": ' + b"[" * depth + b"]" * depth + b"}", NOW)


@pytest.mark.parametrize("number", [2**64, -(2**63) - 1, 10**30])
def test_accepted_values_can_be_put_on_the_bus(number: int) -> None:
    try:
        records = parse_telemetry(f'{{"t": {number}}}'.encode(), NOW)
    except PayloadError:
        return
    encode_message(TelemetryMessage("m1", "dev-1", NOW, records))


# --- properties ------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10)
)
json_documents = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=20,
)
# A telemetry value: anything JSON but null (nested nulls are fine).
telemetry_values = st.recursive(
    st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10),
    lambda children: (
        st.lists(children | st.none(), max_size=3)
        | st.dictionaries(st.text(max_size=6), children | st.none(), max_size=3)
    ),
    max_leaves=8,
)
value_maps = st.dictionaries(
    st.text(min_size=1, max_size=MAX_KEY_LENGTH), telemetry_values, min_size=1, max_size=5
)


@st.composite
def entries(draw: st.DrawFn) -> tuple[Any, TsRecord]:
    """One ThingsBoard entry (either form) and the record it must parse to."""
    values = draw(value_maps)
    if draw(st.booleans()):
        ts = draw(st.integers(0, MAX_TS))
        return {"ts": ts, "values": values}, TsRecord(ts, values)
    # A plain object holding both "ts" and "values" would read as the other form.
    if "ts" in values and "values" in values:
        del values["values"]
    return values, TsRecord(NOW, values)


payloads = st.one_of(
    entries().map(lambda e: (e[0], [e[1]])),
    st.lists(entries(), min_size=1, max_size=5).map(
        lambda es: ([doc for doc, _ in es], [record for _, record in es])
    ),
)


@given(payloads)
def test_every_valid_payload_parses_to_its_records(
    payload: tuple[Any, list[TsRecord]],
) -> None:
    doc, expected = payload
    body = json.dumps(doc, ensure_ascii=False).encode()
    assert as_tuples(parse_telemetry(body, NOW)) == as_tuples(expected)


@given(json_documents)
def test_any_json_document_parses_or_raises_payload_error(doc: Any) -> None:
    body = json.dumps(doc).encode()
    try:
        records = parse_telemetry(body, NOW)
    except PayloadError:
        return
    assert records
    for record in records:
        assert type(record.ts) is int
        assert 0 <= record.ts <= MAX_TS
        assert record.values
        assert None not in record.values.values()


@given(st.text().map(str.encode))
def test_any_utf8_text_parses_or_raises_payload_error(body: bytes) -> None:
    with contextlib.suppress(PayloadError):
        parse_telemetry(body, NOW)


@given(st.binary())
@example(b'{"t": "\xff"}')
def test_any_bytes_parse_or_raise_payload_error(body: bytes) -> None:
    with contextlib.suppress(PayloadError):
        parse_telemetry(body, NOW)
