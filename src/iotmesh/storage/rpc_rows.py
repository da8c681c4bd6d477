"""The columns of a stored RPC request as both state stores write them (SQLite and
PostgreSQL): one mapping, so a field added to `RpcRecord` is written the same way by
both. `encode` turns params and response into the store's JSON column type (bytes for
SQLite, text for PostgreSQL). Also the SQL both stores share for the RPC housekeeping
job (`commands/rpc_housekeeping.py`): when an open request is due, and how it ends."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from iotmesh.core.types import RpcRecord

Encode = Callable[[Any], Any]

OPEN = "('QUEUED', 'SENT', 'DELIVERED')"

DEADLINE = (
    "(CASE WHEN status = 'QUEUED' OR sent_ts IS NULL OR NOT persistent"
    " THEN expiration_ts ELSE sent_ts + timeout_ms END)"
)
"""When an open request ends unless something happens first: `commands.rpc._deadline`
in SQL (a QUEUED request, a call: its expiration; a persistent request sent: its reply
timeout). The same text in the index and the queries, so that SQLite uses the index."""

ENDED = "(CASE WHEN status = 'QUEUED' THEN 'EXPIRED' ELSE 'TIMEOUT' END)"
"""The status a due request ends with: never sent → EXPIRED, sent → TIMEOUT."""

DUE_INDEX = (
    f"CREATE INDEX rpc_requests_due ON rpc_requests ({DEADLINE}, device_id, id)"
    f" WHERE status IN {OPEN}"
)
"""Open requests by deadline: the housekeeping sweep reads the due ones each pass, in
this order, so a page is a range of the index (no scan of every open request)."""

DUE_ORDER = f"{DEADLINE}, device_id, id"
"""The order of `due_rpcs`, and its cursor (deadline, device id, id)."""

RPC_FENCE = "rpc_housekeeping"
"""The fenced resource of the RPC housekeeping job: a store that keeps `fences` refuses
its expiries and purges with a token older than the highest it has seen."""


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
