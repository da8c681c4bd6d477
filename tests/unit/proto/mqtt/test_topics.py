"""Topic names, filters, shared subscriptions, matching and the routing trie."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iotmesh.proto.mqtt import (
    InvalidTopic,
    SharedSubscription,
    TopicTree,
    parse_shared,
    topic_matches,
    validate_topic_filter,
    validate_topic_name,
)

from . import strategies as s

MATCHES = [
    ("a/b", "a/b", True),
    ("a/b", "a/c", False),
    ("a/b", "a/b/c", False),
    ("#", "a", True),
    ("#", "a/b/c", True),
    ("#", "/", True),
    ("a/#", "a", True),  # `#` also matches the parent level
    ("a/#", "a/", True),
    ("a/#", "a/b/c", True),
    ("a/#", "ab", False),
    ("a/#", "b/a", False),
    ("+", "a", True),
    ("+", "a/b", False),
    ("+", "", True),
    ("+/+", "/finance", True),
    ("/+", "/finance", True),
    ("+", "/finance", False),
    ("+/+", "a/b", True),
    ("+/+", "a", False),
    ("sport/+", "sport", False),
    ("sport/+", "sport/", True),
    ("sport/+/player1", "sport/tennis/player1", True),
    ("sport/tennis/+", "sport/tennis/player1/ranking", False),
    ("sport/#", "sport/tennis/player1/ranking", True),
    ("+/tennis/#", "sport/tennis/player1", True),
    ("+/+/#", "a", False),
    ("a/+/#", "a/b", True),
    # spec 4.7.2: wildcards at the first level do not match $-topics
    ("#", "$SYS/broker/load", False),
    ("+/monitor/Clients", "$SYS/monitor/Clients", False),
    ("+", "$SYS", False),
    ("$SYS/#", "$SYS/broker/load", True),
    ("$SYS/monitor/+", "$SYS/monitor/Clients", True),
    ("$SYS", "$SYS", True),
    ("a/+", "a/$b", True),  # the rule is for the first level only
    ("a/#", "a/$b/c", True),
]


@pytest.mark.parametrize(("topic_filter", "topic", "expected"), MATCHES)
def test_topic_matches(topic_filter: str, topic: str, expected: bool) -> None:
    validate_topic_filter(topic_filter)
    assert topic_matches(topic_filter, topic) is expected
    tree: TopicTree[str, str] = TopicTree()
    tree.add(topic_filter, "k", "v")
    assert tree.match(topic) == (["v"] if expected else [])


@pytest.mark.parametrize(
    "name", ["a", "a/b", "/", "//", "$SYS/x", "é/ü", "a b", "x" * 65535, "\u20ac" * 21845]
)
def test_valid_topic_names(name: str) -> None:
    validate_topic_name(name)


@pytest.mark.parametrize(
    "name", ["", "a/+", "#", "a+", "a/#/b", "a\x00b", "x" * 65536, "\u20ac" * 21846, "a\udc00"]
)
def test_invalid_topic_names(name: str) -> None:
    with pytest.raises(InvalidTopic):
        validate_topic_name(name)


@pytest.mark.parametrize(
    "topic_filter",
    [
        "#",
        "+",
        "a/#",
        "+/+",
        "/+",
        "a/+/b",
        "+/#",
        "$SYS/#",
        "$share/g/a/#",
        "$share/g/+",
        "$share",
    ],
)
def test_valid_filters(topic_filter: str) -> None:
    validate_topic_filter(topic_filter)


@pytest.mark.parametrize(
    "topic_filter",
    [
        "",
        "a#",
        "a/#/b",
        "#/a",
        "a+",
        "a/b+",
        "+a",
        "##",
        "a\x00",
        "$share/",
        "$share//a",
        "$share/g",
        "$share/g/",
        "$share/g+/a",
        "$share/#/a",
        "$share/g/a#",
    ],
)
def test_invalid_filters(topic_filter: str) -> None:
    with pytest.raises(InvalidTopic):
        validate_topic_filter(topic_filter)


def test_parse_shared() -> None:
    assert parse_shared("$share/group/a/+/c") == SharedSubscription("group", "a/+/c")
    assert parse_shared("$share/g/#") == SharedSubscription("g", "#")
    assert parse_shared("$share/g//") == SharedSubscription("g", "/")
    assert parse_shared("a/b") is None
    assert parse_shared("$sharex/g/a") is None
    with pytest.raises(InvalidTopic, match="share name"):
        parse_shared("$share//a")
    with pytest.raises(InvalidTopic, match="needs a filter"):
        parse_shared("$share/g")


def test_tree_add_replace_remove_prunes() -> None:
    tree: TopicTree[str, int] = TopicTree()
    assert tree.add("a/+/c", "c1", 1)
    assert not tree.add("a/+/c", "c1", 2)  # same key, same filter: replaced
    assert tree.add("a/#", "c2", 3)
    assert tree.add("a/b/c", "c3", 4)
    assert len(tree) == 3
    assert sorted(tree.match("a/b/c")) == [2, 3, 4]
    assert tree.get("a/+/c", "c1") == 2
    assert tree.remove("a/+/c", "c1") == 2
    assert tree.remove("a/+/c", "c1") is None
    assert tree.remove("x/y", "c1") is None
    assert tree.remove("a/#", "nobody") is None
    assert sorted(tree.match("a/b/c")) == [3, 4]
    tree.remove("a/#", "c2")
    tree.remove("a/b/c", "c3")
    assert len(tree) == 0
    assert tree._root.is_empty()  # every branch was pruned
    with pytest.raises(InvalidTopic):
        tree.add("a/#/b", "c", 0)


@settings(max_examples=80, deadline=None)
@given(
    st.lists(s.topic_filters(s.small_level), min_size=1, max_size=12),
    st.lists(s.topic_names(s.small_level), min_size=1, max_size=12),
    st.data(),
)
def test_tree_matches_like_brute_force(
    filters: list[str], topics: list[str], data: st.DataObject
) -> None:
    tree: TopicTree[int, str] = TopicTree()
    entries: dict[tuple[str, int], str] = {}
    for i, topic_filter in enumerate(filters):
        key = i % 3  # some keys repeat on the same filter: replace, not add
        tree.add(topic_filter, key, f"{topic_filter}#{i}")
        entries[(topic_filter, key)] = f"{topic_filter}#{i}"
    removed = data.draw(st.lists(st.sampled_from(sorted(entries)), max_size=4, unique=True))
    for topic_filter, key in removed:
        assert tree.remove(topic_filter, key) == entries.pop((topic_filter, key))
    assert len(tree) == len(entries)
    for topic in topics:
        expected = sorted(v for (f, _), v in entries.items() if topic_matches(f, topic))
        assert sorted(tree.match(topic)) == expected


@settings(max_examples=200, deadline=None)
@given(s.topic_filters(s.small_level), s.topic_names(s.small_level))
def test_matches_agrees_with_a_regex_model(topic_filter: str, topic: str) -> None:
    """An independent model: translate the filter to a regular expression."""
    import re

    parts = []
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        sep = "/" if i else ""
        if level == "#":
            parts.append("(/.*)?" if i else ".*")
        elif level == "+":
            parts.append(sep + "[^/]*")
        else:
            parts.append(sep + re.escape(level))
    pattern = "".join(parts)
    expected = re.fullmatch(pattern, topic, re.DOTALL) is not None
    if topic.startswith("$") and topic_filter[0] in "+#":
        expected = False
    assert topic_matches(topic_filter, topic) is expected
