"""The columns of a stored RPC request as both state stores write them (SQLite and
PostgreSQL): one mapping, so a field added to `RpcRecord` is written the same way by
both. `encode` turns params and response into the store's JSON column type (bytes for
SQLite, text for PostgreSQL)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from iotmesh.core.types import RpcRecord

Encode = Callable[[Any], Any]


def insert_row(r: RpcRecord, encode: Encode) -> tuple[Any, ...]:
    """Values for `INSERT INTO rpc_requests (<the stores' _COLUMNS>)`, in that order."""
    return (
        r.device_id,
        r.id,
        r.method,
        encode(r.params),
        r.oneway,
        r.persistent,
        r.status.value,
        r.timeout_ms,
        r.created_ts,
        r.expiration_ts,
        r.sent_ts,
        r.delivered_ts,
        r.finished_ts,
        None if r.response is None else encode(r.response),
        r.error,
    )


def update_row(r: RpcRecord, encode: Encode) -> tuple[Any, ...]:
    """Values for `SET status, sent_ts, delivered_ts, finished_ts, response, error`, then
    device id and id for the WHERE."""
    return (
        r.status.value,
        r.sent_ts,
        r.delivered_ts,
        r.finished_ts,
        None if r.response is None else encode(r.response),
        r.error,
        r.device_id,
        r.id,
    )
