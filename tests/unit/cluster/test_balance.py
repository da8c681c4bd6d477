"""Balancing policies and the hash ring."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from iotmesh.cluster.balance import ConsistentHash, HashRing, LeastOutstanding, RoundRobin
from iotmesh.cluster.model import Instance

KEYS = [f"device-{i}" for i in range(2000)]
node_names = st.lists(
    st.text("abcdefgh", min_size=1, max_size=6), min_size=2, max_size=8, unique=True
)


def inst(iid: str, load: float = 0.0) -> Instance:
    return Instance(service="s", instance_id=iid, load=load)


@settings(max_examples=25, deadline=None)
@given(node_names)
def test_removing_a_node_moves_only_its_keys(nodes: list[str]) -> None:
    ring = HashRing(nodes, vnodes=32)
    before = {k: ring.owner(k) for k in KEYS}
    gone = nodes[0]
    ring.remove(gone)
    for k in KEYS:
        if before[k] != gone:
            assert ring.owner(k) == before[k]
        else:
            assert ring.owner(k) != gone
            # It moves to the next node clockwise: the retry order's second entry.


@settings(max_examples=25, deadline=None)
@given(node_names)
def test_adding_a_node_moves_keys_only_to_it(nodes: list[str]) -> None:
    ring = HashRing(nodes[1:], vnodes=32)
    before = {k: ring.owner(k) for k in KEYS}
    ring.add(nodes[0])
    moved = [k for k in KEYS if ring.owner(k) != before[k]]
    assert all(ring.owner(k) == nodes[0] for k in moved)


@settings(max_examples=25, deadline=None)
@given(node_names)
def test_the_walk_visits_every_node_once_owner_first(nodes: list[str]) -> None:
    ring = HashRing(nodes, vnodes=16)
    for k in KEYS[:50]:
        walk = ring.walk(k)
        assert sorted(walk) == sorted(nodes)
        assert walk[0] == ring.owner(k)


def test_virtual_nodes_spread_keys_evenly() -> None:
    ring = HashRing(["a", "b", "c", "d"], vnodes=128)
    counts = Counter(ring.owner(k) for k in KEYS)
    assert min(counts.values()) > len(KEYS) / 4 * 0.6


def test_round_robin_takes_turns() -> None:
    rr = RoundRobin()
    pool = [inst("a"), inst("b"), inst("c")]
    assert [rr.choose(pool, None, {}).instance_id for _ in range(6)] == list("abcabc")


def test_least_outstanding_prefers_the_idlest_then_the_least_loaded() -> None:
    lo = LeastOutstanding()
    pool = [inst("a", 5.0), inst("b", 1.0), inst("c", 0.0)]
    assert lo.choose(pool, None, {"s.a": 0, "s.b": 0, "s.c": 2}).instance_id == "b"
    assert lo.choose(pool, None, {"s.a": 0, "s.b": 1, "s.c": 2}).instance_id == "a"


def test_consistent_hash_sticks_and_fails_over_to_the_ring_neighbour() -> None:
    ch = ConsistentHash(vnodes=64)
    pool = [inst("a"), inst("b"), inst("c")]
    owner = {k: ch.choose(pool, k, {}).instance_id for k in KEYS[:300]}
    assert {k: ch.choose(pool, k, {}).instance_id for k in KEYS[:300]} == owner
    survivors = [i for i in pool if i.instance_id != "a"]
    after = {k: ch.choose(survivors, k, {}).instance_id for k in KEYS[:300]}
    assert all(after[k] == owner[k] for k in owner if owner[k] != "a")
    assert {after[k] for k in owner if owner[k] == "a"} <= {"b", "c"}
    # Back again: its keys return to it.
    assert {k: ch.choose(pool, k, {}).instance_id for k in KEYS[:300]} == owner
