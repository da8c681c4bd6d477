"""Load-balancing policies: which instance of a service gets the next call.

A policy chooses among the instances the discovery client considers usable (alive by
the failure detector, breaker not open, not already tried by this call):

- `RoundRobin`: each in turn.
- `LeastOutstanding`: the one with the fewest calls this client has in flight (ties
  broken by the load the instance reports, then in turn): slow instances get less.
- `ConsistentHash`: by key (a device id), on a hash ring with `vnodes` points per
  instance, so a device keeps going to the same instance, and when one joins or
  leaves only about 1/n of the keys move (those of the instance that left, or to the
  one that joined). A retry goes to the next instance clockwise, which is also where
  the key moves if its instance fails: the failed instance's share is taken over by
  its ring neighbours.
"""

from __future__ import annotations

import abc
import bisect
import hashlib
from collections.abc import Mapping, Sequence

from iotmesh.cluster.model import Instance


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class HashRing:
    """A consistent-hash ring of instance keys with virtual nodes."""

    def __init__(self, nodes: Sequence[str] = (), vnodes: int = 64) -> None:
        self.vnodes = vnodes
        self._points: list[int] = []
        self._owners: list[str] = []
        self._nodes: set[str] = set()
        for node in nodes:
            self.add(node)

    @property
    def nodes(self) -> set[str]:
        return set(self._nodes)

    def add(self, node: str) -> None:
        if node in self._nodes:
            return
        self._nodes.add(node)
        for i in range(self.vnodes):
            point = _hash(f"{node}#{i}")
            at = bisect.bisect_left(self._points, point)
            self._points.insert(at, point)
            self._owners.insert(at, node)

    def remove(self, node: str) -> None:
        if node not in self._nodes:
            return
        self._nodes.discard(node)
        keep = [(p, o) for p, o in zip(self._points, self._owners, strict=True) if o != node]
        self._points = [p for p, _ in keep]
        self._owners = [o for _, o in keep]

    def walk(self, key: str) -> list[str]:
        """Every node, in the order a call for `key` tries them (its owner first)."""
        if not self._points:
            return []
        start = bisect.bisect_right(self._points, _hash(key))
        order: list[str] = []
        for i in range(len(self._points)):
            owner = self._owners[(start + i) % len(self._points)]
            if owner not in order:
                order.append(owner)
                if len(order) == len(self._nodes):
                    break
        return order

    def owner(self, key: str) -> str | None:
        order = self.walk(key)
        return order[0] if order else None


class Policy(abc.ABC):
    """Chooses one of `candidates` (never empty) for a call."""

    @abc.abstractmethod
    def choose(
        self, candidates: Sequence[Instance], key: str | None, outstanding: Mapping[str, int]
    ) -> Instance:
        """`outstanding`: calls in flight per instance key, as this client counts them."""


class RoundRobin(Policy):
    def __init__(self) -> None:
        self._next = 0

    def choose(
        self, candidates: Sequence[Instance], key: str | None, outstanding: Mapping[str, int]
    ) -> Instance:
        chosen = candidates[self._next % len(candidates)]
        self._next += 1
        return chosen


class LeastOutstanding(Policy):
    def __init__(self) -> None:
        self._turn = 0

    def choose(
        self, candidates: Sequence[Instance], key: str | None, outstanding: Mapping[str, int]
    ) -> Instance:
        self._turn += 1
        n = len(candidates)
        # Rotating the start breaks exact ties in turn rather than always to the first.
        rotated = [candidates[(self._turn + i) % n] for i in range(n)]
        return min(rotated, key=lambda i: (outstanding.get(i.key, 0), i.load))


class ConsistentHash(Policy):
    """By key on a ring of every instance seen; falls back to round robin without a key."""

    def __init__(self, vnodes: int = 64) -> None:
        self.ring = HashRing(vnodes=vnodes)
        self._fallback = RoundRobin()

    def choose(
        self, candidates: Sequence[Instance], key: str | None, outstanding: Mapping[str, int]
    ) -> Instance:
        if key is None:
            return self._fallback.choose(candidates, key, outstanding)
        by_key = {c.key: c for c in candidates}
        # The ring follows the usable instances, so a failed one's keys go to its
        # neighbours; it gets them back when it returns.
        for node in self.ring.nodes - by_key.keys():
            self.ring.remove(node)
        for node in by_key:
            self.ring.add(node)
        for node in self.ring.walk(key):
            if node in by_key:
                return by_key[node]
        return candidates[0]


POLICIES: dict[str, type[Policy]] = {
    "round_robin": RoundRobin,
    "least_outstanding": LeastOutstanding,
    "consistent_hash": ConsistentHash,
}
