"""Topic names, topic filters, shared subscriptions and routing (spec 4.7, 4.8.2).

Rules:
- A topic name (what PUBLISH carries) is 1..65535 bytes of UTF-8 without U+0000 and
  without the wildcards `+` and `#`. (v5's empty name with a Topic Alias is the codec's
  business, not a name.)
- A topic filter (what SUBSCRIBE carries) is non-empty; `+` must fill a whole level;
  `#` must fill the last level. `sport/+`, `+/+`, `#`, `a/#` are filters; `a+`, `a/#/b`,
  `a#` are not.
- `$share/{group}/{filter}` is a shared subscription: the group is non-empty and has no
  `/`, `+` or `#`, and a valid filter follows. A filter that starts with `$share/` and is
  not of that shape is invalid (v5 4.8.2; we apply it to v3.1.1 clients too, since the
  server routes `$share/` the same way for both).
- Matching: `+` matches exactly one level (possibly empty), `#` matches the rest
  including nothing, so `a/#` matches `a`. A filter that starts with a wildcard does not
  match a topic whose first level starts with `$` (4.7.2): `#` does not see `$SYS/...`.

Why the trie: routing runs per message, and the number of subscriptions grows with the
fleet; walking the topic's levels through a tree costs O(levels x wildcard branches)
instead of O(subscriptions).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, NamedTuple, TypeVar

from .errors import InvalidTopic

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

SHARE_PREFIX = "$share/"
MAX_TOPIC_BYTES = 65535


def _check_text(topic: str) -> None:
    if not topic:
        raise InvalidTopic(topic, "empty")
    if "\x00" in topic:
        raise InvalidTopic(topic, "contains U+0000")
    # Only long or non-ASCII text can break the byte limit or hold a lone surrogate.
    if not topic.isascii() or len(topic) > MAX_TOPIC_BYTES:
        try:
            size = len(topic.encode("utf-8"))
        except UnicodeEncodeError:
            raise InvalidTopic(topic, "not encodable as UTF-8") from None
        if size > MAX_TOPIC_BYTES:
            raise InvalidTopic(topic[:32] + "...", f"{size} bytes, over {MAX_TOPIC_BYTES}")


def validate_topic_name(topic: str) -> None:
    """Raise `InvalidTopic` unless `topic` may be published to."""
    if "+" in topic or "#" in topic:
        raise InvalidTopic(topic, "wildcards are not allowed in a topic name")
    _check_text(topic)


def _check_levels(topic_filter: str) -> None:
    if "+" not in topic_filter and "#" not in topic_filter:
        return
    levels = topic_filter.split("/")
    last = len(levels) - 1
    for i, level in enumerate(levels):
        if level == "#":
            if i != last:
                raise InvalidTopic(topic_filter, "'#' must be the last level")
        elif level != "+" and ("+" in level or "#" in level):
            raise InvalidTopic(topic_filter, "a wildcard must fill a whole level")


class SharedSubscription(NamedTuple):
    group: str
    topic_filter: str


def parse_shared(topic_filter: str) -> SharedSubscription | None:
    """Split `$share/{group}/{filter}`; None for a filter that is not shared.

    Raises:
        InvalidTopic: it starts with `$share/` but the group or the filter is invalid.
    """
    if not topic_filter.startswith(SHARE_PREFIX):
        return None
    group, slash, inner = topic_filter[len(SHARE_PREFIX) :].partition("/")
    if not group or "+" in group or "#" in group:
        raise InvalidTopic(topic_filter, "a share name must be non-empty, without '+' or '#'")
    if not slash or not inner:
        raise InvalidTopic(topic_filter, "a shared subscription needs a filter after the group")
    _check_text(inner)
    _check_levels(inner)
    return SharedSubscription(group, inner)


def validate_topic_filter(topic_filter: str) -> None:
    """Raise `InvalidTopic` unless `topic_filter` may be subscribed to."""
    _check_text(topic_filter)
    if topic_filter.startswith(SHARE_PREFIX):
        parse_shared(topic_filter)
    else:
        _check_levels(topic_filter)


def is_wildcard(topic_filter: str) -> bool:
    return "+" in topic_filter or "#" in topic_filter


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether a (valid, non-shared) filter matches a (valid) topic name."""
    if "+" not in topic_filter and "#" not in topic_filter:
        return topic_filter == topic
    if topic[:1] == "$" and topic_filter[0] in ("+", "#"):
        return False
    names = topic.split("/")
    count = len(names)
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if level == "#":
            return True
        if i >= count or (level != "+" and level != names[i]):
            return False
    return len(levels) == count


class _Node(Generic[K, V]):
    __slots__ = ("children", "hash", "plus", "values")

    def __init__(self) -> None:
        self.children: dict[str, _Node[K, V]] = {}
        self.plus: _Node[K, V] | None = None
        self.hash: _Node[K, V] | None = None
        self.values: dict[K, V] = {}

    def child(self, level: str) -> _Node[K, V] | None:
        if level == "+":
            return self.plus
        if level == "#":
            return self.hash
        return self.children.get(level)

    def make_child(self, level: str) -> _Node[K, V]:
        node = self.child(level)
        if node is None:
            node = _Node()
            if level == "+":
                self.plus = node
            elif level == "#":
                self.hash = node
            else:
                self.children[level] = node
        return node

    def drop_child(self, level: str) -> None:
        if level == "+":
            self.plus = None
        elif level == "#":
            self.hash = None
        else:
            del self.children[level]

    def is_empty(self) -> bool:
        return not self.values and not self.children and self.plus is None and self.hash is None


class TopicTree(Generic[K, V]):
    """Topic filters mapped to subscribers, for routing a topic to every match.

    Each filter holds a map `key -> value`: one entry per subscriber (key: e.g. the
    client id; value: what routing needs, e.g. the session and the subscription
    options). Adding the same key to the same filter replaces its value, which is what
    MQTT asks of a repeated SUBSCRIBE (3.8.4). For a shared subscription, add the inner
    filter of `parse_shared` under a key that names the group.
    """

    __slots__ = ("_count", "_root")

    def __init__(self) -> None:
        self._root: _Node[K, V] = _Node()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, topic_filter: str, key: K, value: V) -> bool:
        """Subscribe `key` to `topic_filter`; return False if it replaced an entry.

        Raises:
            InvalidTopic: the filter is not valid.
        """
        validate_topic_filter(topic_filter)
        node = self._root
        for level in topic_filter.split("/"):
            node = node.make_child(level)
        new = key not in node.values
        node.values[key] = value
        self._count += new
        return new

    def remove(self, topic_filter: str, key: K) -> V | None:
        """Unsubscribe `key` from `topic_filter`; return its value, None if absent."""
        path: list[tuple[_Node[K, V], str]] = []
        node: _Node[K, V] | None = self._root
        for level in topic_filter.split("/"):
            assert node is not None
            path.append((node, level))
            node = node.child(level)
            if node is None:
                return None
        assert node is not None
        if key not in node.values:
            return None
        value = node.values.pop(key)
        self._count -= 1
        for parent, level in reversed(path):  # prune branches nobody uses any more
            child = parent.child(level)
            if child is None or not child.is_empty():
                break
            parent.drop_child(level)
        return value

    def get(self, topic_filter: str, key: K) -> V | None:
        node: _Node[K, V] | None = self._root
        for level in topic_filter.split("/"):
            assert node is not None
            node = node.child(level)
            if node is None:
                return None
        assert node is not None
        return node.values.get(key)

    def match(self, topic: str) -> list[V]:
        """Values of every filter matching `topic`, once per (filter, key) entry."""
        out: list[V] = []
        nodes = [self._root]
        dollar = topic[:1] == "$"
        for level in topic.split("/"):
            following: list[_Node[K, V]] = []
            for node in nodes:
                if node.hash is not None and not dollar:
                    out.extend(node.hash.values.values())
                child = node.children.get(level)
                if child is not None:
                    following.append(child)
                if node.plus is not None and not dollar:
                    following.append(node.plus)
            if not following:
                return out
            nodes = following
            dollar = False  # the $-rule concerns the first level only
        for node in nodes:
            out.extend(node.values.values())
            if node.hash is not None:  # `a/#` also matches `a`
                out.extend(node.hash.values.values())
        return out
