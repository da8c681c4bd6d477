"""Subject names and NATS-style wildcard matching (`*` one token, `>` the rest)."""

from __future__ import annotations

import functools
import zlib

TELEMETRY = "telemetry"

# Live broadcasts (`broadcast.py`): the subject space, and the topics in it.
LIVE = "live"
SHARED_ATTRIBUTES = "attributes"  # committed SHARED attribute changes
RPC_WAKE = "rpc.wake"  # a device has QUEUED RPC requests in the store
RPC_DONE = "rpc.done"  # an RPC request is finished (committed)


def telemetry_subject(device_id: str) -> str:
    """The subject of a device's telemetry messages."""
    return f"{TELEMETRY}.{device_id}"


@functools.lru_cache(maxsize=4096)
def _tokens(text: str) -> tuple[str, ...]:
    return tuple(text.split("."))


def matches(pattern: str, subject: str) -> bool:
    """Tell whether `subject` matches `pattern` with NATS wildcard rules."""
    want = _tokens(pattern)
    have = _tokens(subject)
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or (token != "*" and token != have[i]):
            return False
    return len(want) == len(have)


def partition_of(key: str, partitions: int) -> int:
    """The partition a key maps to; stable across processes (unlike `hash`)."""
    return zlib.crc32(key.encode()) % partitions
