"""Raw-point TTLs on InfluxDB 1.x: `DELETE` statements built from a `RetentionPolicy`.

Why not InfluxDB's own retention policies: an RP's duration holds for a whole
measurement (every device and key alike) and is counted in shard groups, while iotmesh
TTLs differ per key and per device type. Rollups are not continuous queries either
(see `rollups.py`): they are recomputed from raw points by iotmesh, and brought up to
date before raw points expire, so aggregates of an expired range keep answering.

A series' TTL is the one `RetentionPolicy.raw_ttl` gives: specific rules (its key's,
its device's) override the default; the longest of them wins; 0 keeps forever. The
statements partition the series by which rules match them, so each series is deleted
up to its own cutoff exactly once. With rollups, cutoffs are aligned down to the
coarsest level, so no bucket is ever half expired (as on SQLite).
"""

from __future__ import annotations

from iotmesh.storage.influx.client import literal
from iotmesh.storage.influx.lineproto import MEASUREMENT, encode_tag
from iotmesh.storage.rollup import RetentionPolicy


def _tag(name: str, value: str, op: str = "=") -> str:
    return f'"{name}" {op} {literal(encode_tag(value))}'


def statements(policy: RetentionPolicy, align_ms: int = 1) -> list[str]:
    """The `DELETE` statements that expire raw points by `policy`.

    Args:
        align_ms: cutoffs are aligned down to a multiple of it (the coarsest level).
    """
    out: list[str] = []

    def delete(ttl: int, conditions: list[str]) -> None:
        if ttl > 0:
            cutoff = policy.now_ms - ttl
            cutoff_ns = (cutoff - cutoff % align_ms) * 1_000_000
            where = " AND ".join([*conditions, f"time < {cutoff_ns}"])
            out.append(f"DELETE FROM {MEASUREMENT} WHERE {where}")

    not_keys = [_tag("key", k, "!=") for k in sorted(policy.keys)]
    not_entities = [_tag("entity", e, "!=") for e in sorted(policy.entities)]
    delete(policy.raw_ttl_ms, not_keys + not_entities)
    for key, ttl in sorted(policy.keys.items()):
        delete(ttl, [_tag("key", key), *not_entities])
    for entity, ttl in sorted(policy.entities.items()):
        delete(ttl, [_tag("entity", entity), *not_keys])
        for key in sorted(policy.keys):
            delete(policy.raw_ttl(entity, key), [_tag("entity", entity), _tag("key", key)])
    return out
