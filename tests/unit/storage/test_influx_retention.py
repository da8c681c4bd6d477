"""InfluxDB raw TTLs: one DELETE per rule, the series partitioned by the rules that match."""

from __future__ import annotations

from iotmesh.storage.influx.retention import statements
from iotmesh.storage.rollup import RetentionPolicy

MS = 1_000_000  # ns


def test_default_only() -> None:
    policy = RetentionPolicy(now_ms=10_000, raw_ttl_ms=4_000)
    assert statements(policy) == [f"DELETE FROM telemetry WHERE time < {6_000 * MS}"]


def test_nothing_expires_without_ttls() -> None:
    assert statements(RetentionPolicy(now_ms=10_000, keys={"a": 0})) == []


def test_overrides_partition_the_series() -> None:
    policy = RetentionPolicy(
        now_ms=10_000, raw_ttl_ms=4_000, keys={"b": 0, "c": 2_000}, entities={"d'2": 8_000}
    )
    assert statements(policy) == [
        "DELETE FROM telemetry WHERE \"key\" != 'b' AND \"key\" != 'c' AND \"entity\" != 'd\\'2'"
        f" AND time < {6_000 * MS}",
        "DELETE FROM telemetry WHERE \"key\" = 'c' AND \"entity\" != 'd\\'2'"
        f" AND time < {8_000 * MS}",
        "DELETE FROM telemetry WHERE \"entity\" = 'd\\'2' AND \"key\" != 'b' AND \"key\" != 'c'"
        f" AND time < {2_000 * MS}",
        # d'2 and c: the longer of 8 s and 2 s; d'2 and b: b keeps forever, no statement
        "DELETE FROM telemetry WHERE \"entity\" = 'd\\'2' AND \"key\" = 'c'"
        f" AND time < {2_000 * MS}",
    ]
