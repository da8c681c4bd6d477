"""The naming rules the engine buses share (durable.py) and `make_bus`."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iotmesh.bus import make_bus
from iotmesh.bus.durable import (
    bus_subject,
    dead_letter_subject,
    engine_subject,
    group_id,
    split_pattern,
)
from iotmesh.bus.interface import BusError
from iotmesh.bus.memory import MemoryBus
from iotmesh.bus.nats import NatsBus
from iotmesh.bus.redis_streams import RedisBus
from iotmesh.bus.subjects import partition_of
from iotmesh.core.settings import BusSettings

name = st.from_regex(r"[A-Za-z0-9_-]{1,12}", fullmatch=True)
token = st.text(
    st.characters(blacklist_characters=".*> \t\r\n", blacklist_categories=("Cs",)),
    min_size=1,
    max_size=12,
)


@given(
    space=name,
    rest=st.lists(token, max_size=4),
    key=st.text(max_size=20),
    partitions=st.integers(1, 64),
)
def test_engine_subject_round_trips_and_carries_the_partition(
    space: str, rest: list[str], key: str, partitions: int
) -> None:
    subject = ".".join([space, *rest])
    stored = engine_subject("ns", subject, partitions, key)
    assert stored.split(".")[:3] == ["ns", space, f"p{partition_of(key, partitions)}"]
    assert bus_subject("ns", stored) == subject


def test_engine_subject_wants_a_plain_subject_space() -> None:
    with pytest.raises(BusError, match="subject space"):
        engine_subject("ns", "tele metry.dev-1", 4, "dev-1")


def test_split_pattern_needs_a_literal_subject_space() -> None:
    assert split_pattern("telemetry.>") == ("telemetry", ">")
    assert split_pattern("telemetry") == ("telemetry", "")
    for pattern in (">", "*.dev-1", "a b.c"):
        with pytest.raises(BusError, match="first token"):
            split_pattern(pattern)


def test_group_ids_differ_by_pattern_and_refuse_odd_names() -> None:
    assert group_id("pipeline", "telemetry.>") != group_id("pipeline", "telemetry.*")
    assert group_id("pipeline", "telemetry.>").startswith("pipeline-")
    with pytest.raises(BusError, match="group"):
        group_id("pipe.line", "telemetry.>")
    with pytest.raises(BusError, match="group"):
        group_id("pipeline\n", "telemetry.>")  # `$` alone would let a newline through


def test_dead_letter_subject_names_group_and_subject() -> None:
    settings = BusSettings()
    assert dead_letter_subject(settings, "pipeline", "telemetry.d") == (
        "deadletter.pipeline.telemetry.d"
    )


@pytest.mark.parametrize(
    ("backend", "cls"), [("memory", MemoryBus), ("nats", NatsBus), ("redis", RedisBus)]
)
def test_make_bus_picks_the_configured_backend(backend: str, cls: type) -> None:
    assert type(make_bus(BusSettings(backend=backend))) is cls  # type: ignore[arg-type]


def test_namespace_must_be_a_plain_name() -> None:
    with pytest.raises(ValueError, match="namespace"):
        BusSettings(namespace="iot.mesh")
