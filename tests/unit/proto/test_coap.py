"""proto/coap: device API paths, queries, Content-Formats and the CBOR → JSON model."""

from __future__ import annotations

import contextlib
import json
import math
from typing import Any

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from iotmesh.core.errors import NotFound, PayloadError
from iotmesh.proto import coap
from iotmesh.proto.coap import CBOR, JSON, TEXT_PLAIN, Resource, Target

# --- paths -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "target"),
    [
        ("api/v1/T/telemetry", Target("T", Resource.TELEMETRY)),
        ("api/v1/T/attributes", Target("T", Resource.ATTRIBUTES)),
        ("api/v1/T/attributes/updates", Target("T", Resource.ATTRIBUTE_UPDATES)),
        ("api/v1/T/rpc", Target("T", Resource.RPC)),
        ("api/v1/T/rpc/42", Target("T", Resource.RPC, 42)),
    ],
)
def test_paths_of_the_device_api(path: str, target: Target) -> None:
    assert coap.parse_path(path.split("/")) == target


@pytest.mark.parametrize(
    "path",
    ["", "api", "api/v1/T", "api/v2/T/telemetry", "api/v1//telemetry", "api/v1/T/other",
     "api/v1/T/telemetry/x", "api/v1/T/rpc/1/2", "x/v1/T/telemetry"],
)  # fmt: skip
def test_other_paths_are_not_found(path: str) -> None:
    with pytest.raises(NotFound):
        coap.parse_path(path.split("/") if path else [])


@pytest.mark.parametrize("rpc_id", ["abc", "-1", "1.5", "", "\u0661", "9" * 19])
def test_rpc_ids_must_be_numbers(rpc_id: str) -> None:
    with pytest.raises(PayloadError):
        coap.parse_path(["api", "v1", "T", "rpc", rpc_id])


def test_paths_without_a_token_in_a_dtls_session() -> None:
    assert coap.parse_path(["api", "v1", "telemetry"], session=True) == Target(
        None, Resource.TELEMETRY
    )
    assert coap.parse_path(["api", "v1", "rpc", "7"], session=True) == Target(None, Resource.RPC, 7)
    assert coap.parse_path(["api", "v1", "T", "attributes"], session=True) == Target(
        "T", Resource.ATTRIBUTES
    )
    with pytest.raises(NotFound):
        coap.parse_path(["api", "v1", "telemetry"])  # no session: a token is needed


@given(st.lists(st.text(max_size=20), max_size=8))
def test_any_path_is_a_target_or_a_clear_error(segments: list[str]) -> None:
    try:
        target = coap.parse_path(segments)
    except (NotFound, PayloadError):
        return
    assert target.token == segments[2]


def test_query() -> None:
    assert coap.parse_query(["clientKeys=a,b", "sharedKeys=c", "flag", "x=1", "x=2"]) == {
        "clientKeys": "a,b",
        "sharedKeys": "c",
        "flag": "",
        "x": "2",
    }


# --- formats ---------------------------------------------------------------------------


def test_request_and_answer_formats() -> None:
    assert coap.request_format(None) == JSON
    assert coap.request_format(TEXT_PLAIN) == JSON
    assert coap.request_format(JSON) == JSON
    assert coap.request_format(CBOR) == CBOR
    with pytest.raises(coap.UnsupportedFormat):
        coap.request_format(41)
    assert coap.answer_format(None, None) == JSON
    assert coap.answer_format(None, CBOR) == CBOR
    assert coap.answer_format(JSON, CBOR) == JSON
    assert coap.answer_format(CBOR, None) == CBOR
    assert coap.answer_format(TEXT_PLAIN, None) == JSON
    with pytest.raises(coap.NotAcceptable):
        coap.answer_format(41, None)


# --- payloads --------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@given(json_values)
def test_cbor_and_json_decode_to_the_same_data(value: Any) -> None:
    from_cbor = coap.decode_payload(cbor2.dumps(value), CBOR)
    assert from_cbor == value
    assert coap.decode_payload(json.dumps(value).encode(), JSON) == json.loads(json.dumps(value))


@given(json_values, st.sampled_from([JSON, CBOR]))
def test_encode_then_decode(value: Any, fmt: int) -> None:
    assert coap.decode_payload(coap.encode_payload(value, fmt), fmt) == value


@given(st.binary(max_size=200))
def test_any_bytes_decode_or_raise_payload_error(body: bytes) -> None:
    for fmt in (JSON, CBOR):
        with contextlib.suppress(PayloadError):
            coap.decode_payload(body, fmt)


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"", "end of stream"),
        (b"\x01\x02", "after the end"),
        (b"\xa1\x01\x02", "keys must be text"),
        (b"\x43abc", "bytes"),
        (b"\xf7", "Undefined"),
        (b"\xc1\x01", "datetime"),
        (cbor2.dumps(math.nan), "NaN"),
        (cbor2.dumps(-math.inf), "NaN and infinite"),
        (b"\x81" * 100 + b"\x01", "nested deeper"),
        (b"\x81" * 1000 + b"\x01", "nesting depth"),
    ],
)
def test_cbor_without_a_json_equivalent_is_refused(body: bytes, why: str) -> None:
    with pytest.raises(PayloadError, match=why):
        coap.decode_payload(body, CBOR)
