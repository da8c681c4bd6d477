"""Pipeline stages: small processors chained like structlog's.

A processor takes one message and returns it (changed or not); raising `Drop` removes
the message from the batch with a reason, and the bus dead-letters it (it can never be
processed, so retrying would only repeat the failure). Per-message processors run
first; the store and latest-value steps then work on the whole batch at once, because
group commit is what makes ingest fast.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import msgspec

from iotmesh.core.types import TelemetryMessage

Processor = Callable[[TelemetryMessage], TelemetryMessage]


class Drop(Exception):
    """Raised by a processor to drop a message; `reason` is logged and dead-lettered."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


_decoder = msgspec.msgpack.Decoder(TelemetryMessage)
_encoder = msgspec.msgpack.Encoder()


def encode_message(message: TelemetryMessage) -> bytes:
    """Encode a message for the bus (MessagePack; keeps int/float/bool/str apart)."""
    return _encoder.encode(message)


def decode(data: bytes) -> TelemetryMessage:
    """First stage: bus bytes to a typed message."""
    try:
        return _decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise Drop(f"undecodable telemetry message: {exc}") from None


def make_validator(max_records: int = 10_000) -> Processor:
    """A stage that refuses empty or oversized messages and drops empty records."""

    def validate(message: TelemetryMessage) -> TelemetryMessage:
        if len(message.records) > max_records:
            raise Drop(f"{len(message.records)} records in one message (limit {max_records})")
        records = [r for r in message.records if r.values]
        if not records:
            raise Drop("message has no values")
        if len(records) != len(message.records):
            message.records = records
        return message

    return validate


def make_cpu_work(microseconds: float) -> Processor:
    """A stage that keeps the CPU busy for `microseconds` per record (benchmarks only:
    `pipeline.cpu_work_us` stands in for heavy rules, so that scaling out can be measured
    where the pipeline, not the store, is the bottleneck). Per record, not per message:
    a transport may merge a device's uploads of one socket read into one message."""
    seconds = microseconds / 1e6

    def work(message: TelemetryMessage) -> TelemetryMessage:
        end = time.perf_counter() + seconds * len(message.records)
        while time.perf_counter() < end:
            pass
        return message

    return work
