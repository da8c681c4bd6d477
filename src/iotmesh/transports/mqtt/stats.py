"""Counters of the MQTT server (exposed on /metrics with the observability issue)."""

from __future__ import annotations

import msgspec


class MqttStats(msgspec.Struct):
    """Plain counters: cheap to bump on the hot path, read by benchmarks and health."""

    connections: int = 0
    connections_total: int = 0
    auth_failures: int = 0
    messages_in: list[int] = msgspec.field(default_factory=lambda: [0, 0, 0])  # by QoS
    incoming_unacked_peak: int = 0  # most QoS 1/2 messages one connection had unacked
    messages_out: int = 0
    bytes_in: int = 0
    dropped_by_acl: int = 0
    protocol_errors: int = 0
    telemetry_batches: int = 0
    commit_latency_ms_last: float = 0.0
