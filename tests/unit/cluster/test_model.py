"""Instance records as stored in the engine: round trip, and any bytes are safe to read."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from iotmesh.cluster.model import Instance, check_name, decode, encode

names = st.from_regex(r"[A-Za-z0-9_-]{1,20}", fullmatch=True)
instances = st.builds(
    Instance,
    service=names,
    instance_id=names,
    addresses=st.lists(st.text(max_size=30), max_size=3),
    version=st.text(max_size=10),
    started_ms=st.integers(0, 2**53),
    heartbeat_ms=st.integers(0, 2**53),
    interval_s=st.floats(0.001, 1e4),
    seq=st.integers(0, 2**53),
    load=st.floats(0, 1e9),
    health=st.sampled_from(["ok", "degraded", "draining"]),
    metadata=st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3),
)


@given(instances)
def test_records_round_trip(instance: Instance) -> None:
    assert decode(encode(instance)) == instance


@given(st.binary(max_size=300))
def test_any_bytes_decode_or_raise_decode_error(data: bytes) -> None:
    try:
        got = decode(data)
    except msgspec.DecodeError:
        return
    assert isinstance(got, Instance)


@given(st.text(max_size=30))
def test_names_fit_engine_keys_or_are_refused(name: str) -> None:
    try:
        check_name("service", name)
    except ValueError:
        return
    assert name
    assert all(c.isascii() and (c.isalnum() or c in "-_") for c in name)


def test_a_bad_name_says_what_is_allowed() -> None:
    with pytest.raises(ValueError, match="letters, digits"):
        check_name("service", "a.b")
