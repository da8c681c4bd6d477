"""Line protocol encoding of telemetry for InfluxDB (the server round trip is tested in
tests/integration/test_influxdb_lineproto.py)."""

from __future__ import annotations

import math
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iotmesh.core.errors import PayloadError
from iotmesh.core.types import TsRecord
from iotmesh.storage.influx.lineproto import (
    MAX_TS_MS,
    MIN_TS_MS,
    bodies,
    check_ts,
    decode_tag,
    encode_batch,
    encode_tag,
    escape_string_field,
    escape_tag,
    fields,
)
from iotmesh.storage.timeseries import SeriesWrite


@given(st.text())
def test_tag_encoding_round_trips_and_is_safe(value: str) -> None:
    stored = encode_tag(value)
    assert decode_tag(stored) == value
    assert stored  # InfluxDB drops empty tags
    assert "\\" not in stored
    assert not re.search(r"[\x00-\x1f\x7f]", stored)
    # Every % starts an escape, except the lone % of the empty string.
    assert stored == "%" or re.fullmatch(r"([^%]|%[0-9A-F]{2})*", stored)


def test_tags_stay_readable() -> None:
    assert encode_tag("temperature °C") == "temperature °C"
    assert escape_tag("a b,c=d") == r"a\ b\,c\=d"
    assert encode_tag("") == "%"
    assert encode_tag("%") == "%25"
    assert encode_tag("x\\") == "x%5C"
    assert encode_tag("a\nb") == "a%0Ab"


def test_string_fields_escape_quotes_and_backslashes() -> None:
    assert escape_string_field('say "hi"\\') == r'"say \"hi\"\\"'
    assert escape_string_field("two\nlines") == '"two\nlines"'


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (21.5, "kind=0i,v_d=21.5"),
        (3.0, "kind=0i,v_d=3.0"),
        (1e300, "kind=0i,v_d=1e+300"),
        (42, "kind=1i,v_l=42i"),
        (-(2**63), f"kind=1i,v_l={-(2**63)}i"),
        (2**63, "kind=0i,v_d=9.223372036854776e+18"),  # outside int64: a double
        (True, "kind=2i,v_b=true"),
        ("on", 'kind=3i,v_s="on"'),
        ({"a": [1, None]}, 'kind=4i,v_j="{\\"a\\":[1,null]}"'),
        (math.inf, 'kind=5i,v_s="inf"'),
        (-math.inf, 'kind=5i,v_s="-inf"'),
        (math.nan, 'kind=5i,v_s="nan"'),
    ],
)
def test_fields_per_kind(value: object, expected: str) -> None:
    assert fields(value) == expected


def test_timestamps_outside_influxdb_range_are_refused() -> None:
    check_ts(MIN_TS_MS)
    check_ts(MAX_TS_MS)
    for ts in (MIN_TS_MS - 1, MAX_TS_MS + 1):
        with pytest.raises(PayloadError, match="outside"):
            check_ts(ts)
    with pytest.raises(PayloadError):
        encode_batch([SeriesWrite("d", [TsRecord(MAX_TS_MS + 1, {"t": 1})])])


def test_batch_keeps_the_last_write_of_a_point() -> None:
    batch = [
        SeriesWrite("dev 1", [TsRecord(5, {"t": 1.0, "u": 1}), TsRecord(5, {"t": "x"})]),
        SeriesWrite("dev 1", [TsRecord(6, {"t": 2})]),
    ]
    assert encode_batch(batch).decode().splitlines() == [
        r'telemetry,entity=dev\ 1,key=t kind=3i,v_s="x" 5',
        r"telemetry,entity=dev\ 1,key=u kind=1i,v_l=1i 5",
        r"telemetry,entity=dev\ 1,key=t kind=1i,v_l=2i 6",
    ]
    assert encode_batch([]) == b""


def test_large_batches_are_cut_into_bodies_at_line_ends() -> None:
    lines = [f"telemetry,entity=d,key=k kind=1i,v_l={i}i {i}" for i in range(1000)]
    parts = bodies(lines, 4096)
    assert len(parts) > 1
    assert all(len(p) <= 4096 + 100 for p in parts)
    assert b"".join(parts).decode().splitlines() == lines
    assert bodies([], 4096) == []
