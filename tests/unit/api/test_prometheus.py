"""The exposition writer, checked by Prometheus' own parser (prometheus_client)."""

from __future__ import annotations

import math
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from iotmesh.api.prometheus import Registry, label_name, metric_name


def parse(text: str) -> dict[str, tuple[str, dict[tuple[tuple[str, str], ...], float]]]:
    """Sample name → (family type, {labels: value}) as Prometheus reads the text."""
    families: dict[str, tuple[str, dict[tuple[tuple[str, str], ...], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            _, samples = families.setdefault(s.name, (family.type, {}))
            samples[tuple(sorted(s.labels.items()))] = s.value
    return families


def test_services_stats_become_counters_and_gauges() -> None:
    registry = Registry()
    registry.add_stats(
        "iotmesh_mqtt",
        {
            "connections": 3,
            "connections_total": 10,
            "messages_in": [0, 120, 4],
            "commit_latency_ms_last": 1.5,
            "healthy": True,
            "name": "not a number",
            "nothing": None,
            "by_kind": {"a": 1, "b": 2},
        },
        counters={"connections_total", "messages_in"},
        labels={"messages_in": "qos"},
    )
    families = parse(registry.render())
    assert families["iotmesh_mqtt_connections"] == ("gauge", {(): 3})
    assert families["iotmesh_mqtt_connections_total"] == ("counter", {(): 10})
    kind, samples = families["iotmesh_mqtt_messages_in_total"]
    assert kind == "counter"
    assert samples == {(("qos", "0"),): 0, (("qos", "1"),): 120, (("qos", "2"),): 4}
    assert families["iotmesh_mqtt_commit_latency_ms_last"] == ("gauge", {(): 1.5})
    assert families["iotmesh_mqtt_healthy"] == ("gauge", {(): 1})
    assert families["iotmesh_mqtt_by_kind_a"] == ("gauge", {(): 1})
    assert not any("name" in f or "nothing" in f for f in families)


def test_odd_values_and_label_values_are_escaped() -> None:
    registry = Registry()
    registry.add("x", "gauge", "help with \\ and \n newline", math.inf)
    registry.add("y", "gauge", "h", math.nan, (("path", 'a"b\\c\nd'),))
    registry.add("z", "gauge", "h", -math.inf)
    families = parse(registry.render())
    assert families["x"] == ("gauge", {(): math.inf})
    [(labels, value)] = families["y"][1].items()
    assert labels == (("path", 'a"b\\c\nd'),)
    assert math.isnan(value)
    assert families["z"] == ("gauge", {(): -math.inf})


def test_a_name_taken_by_another_type_keeps_the_first() -> None:
    registry = Registry()
    registry.add("a-b", "gauge", "first", 1)
    registry.add("a_b", "gauge", "second", 2)
    registry.add("c", "counter", "counter", 1)
    registry.add("c_total", "gauge", "clash", 2)
    families = parse(registry.render())
    assert families["a_b"] == ("gauge", {(): 1})
    assert families["c_total"] == ("counter", {(): 1})


names = st.text(min_size=1, max_size=12)
numbers = st.one_of(
    st.integers(min_value=-(2**53), max_value=2**53),
    st.floats(allow_nan=False),
    st.booleans(),
)
values: st.SearchStrategy[Any] = st.recursive(
    st.one_of(numbers, st.none(), st.text(max_size=5)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(names, inner, max_size=4)),
    max_leaves=12,
)


@given(
    service=names,
    stats=st.dictionaries(names, values, max_size=6),
    counters=st.sets(names, max_size=3),
    labels=st.dictionaries(names, names, max_size=3),
)
def test_any_stats_render_to_text_prometheus_parses(
    service: str,
    stats: dict[str, Any],
    counters: set[str],
    labels: dict[str, str],
) -> None:
    registry = Registry()
    registry.add_stats(metric_name(f"iotmesh_{service}"), stats, counters, labels)
    text = registry.render()
    families = list(text_string_to_metric_families(text))
    lines = [line for line in text.split("\n") if line and not line.startswith("#")]
    assert sum(len(f.samples) for f in families) == len(lines)


@given(st.text())
def test_sanitized_names_are_valid(text: str) -> None:
    import re

    assert re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", metric_name(text))
    label = label_name(text)
    assert re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", label)
    assert not label.startswith("__")
