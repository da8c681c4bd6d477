"""The device rows both state stores read (SQLite and PostgreSQL): one column list and
one mapping to `Device`, so a field added to the device is read the same way by both.
The SQL is plain enough for both dialects (no placeholders in it)."""

from __future__ import annotations

from typing import Any, Protocol

from iotmesh.core.types import Device

DEVICE_COLUMNS = """
    d.id, d.name, d.type, d.label, d.created_ts, c.access_token, d.gateway, d.gateway_id,
    c.cert_fingerprint
"""
SELECT_DEVICE = f"SELECT {DEVICE_COLUMNS} FROM devices d JOIN credentials c ON c.device_id = d.id"
SELECT_BASIC = (
    f"SELECT {DEVICE_COLUMNS}, b.client_id, b.username, b.password_hash"
    " FROM devices d JOIN credentials c ON c.device_id = d.id"
    " JOIN basic_credentials b ON b.device_id = d.id"
)
"""A device with its MQTT Basic credentials, the last three columns."""


class Row(Protocol):
    """A row by column position: a sqlite3 tuple or an asyncpg `Record`."""

    def __getitem__(self, index: int, /) -> Any: ...


def device_from_row(row: Row) -> Device:
    """A row of `DEVICE_COLUMNS` (SQLite stores `gateway` as 0/1, PostgreSQL as bool)."""
    return Device(
        id=row[0],
        name=row[1],
        type=row[2],
        label=row[3],
        created_ts=row[4],
        access_token=row[5],
        gateway=bool(row[6]),
        gateway_id=row[7],
        cert_fingerprint=row[8],
    )
