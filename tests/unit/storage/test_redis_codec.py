"""The latest-value encoding in Redis (`<ts>:` + msgpack): every value kind round-trips,
and bytes that are not ours fail with a decode error, nothing else."""

from __future__ import annotations

import contextlib
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from iotmesh.core.types import TsPoint
from iotmesh.storage.redis.latest import decode_point, encode_point

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=10,
)


@given(ts=st.integers(-(2**63), 2**63 - 1), value=json_values)
def test_points_round_trip(ts: int, value: Any) -> None:
    point = decode_point(encode_point(ts, value))
    assert point == TsPoint(ts, value)
    assert type(point.value) is type(value)


@given(data=st.binary(max_size=64))
def test_foreign_bytes_fail_only_with_decode_errors(data: bytes) -> None:
    with contextlib.suppress(ValueError, msgspec.DecodeError):
        decode_point(data)


def test_the_timestamp_comes_first_as_text() -> None:
    assert encode_point(1700000000000, True).startswith(b"1700000000000:")
    with pytest.raises(ValueError, match="invalid literal"):
        decode_point(b"x:\xc3")
