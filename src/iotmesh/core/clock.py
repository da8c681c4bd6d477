"""Time in the units the platform stores: Unix milliseconds."""

from __future__ import annotations

import time


def now_ms() -> int:
    """Return the current wall-clock time in Unix milliseconds."""
    return time.time_ns() // 1_000_000
