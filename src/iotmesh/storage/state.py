"""The state store interface: devices, their credentials, attributes, RPC requests and
when each device was last heard from.

Implementations: SQLite (`storage/sqlite/state.py`) and PostgreSQL
(`storage/postgres/state.py`); both pass tests/contract/test_state.py. Unique names,
tokens, certificates and MQTT Basic logins are enforced by the store, which raises
`Conflict` naming the field.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from iotmesh.core.types import (
    Attribute,
    AttributeScope,
    BasicCredentials,
    Device,
    DeviceActivity,
    RpcRecord,
    RpcStatus,
)


class StateStore(Protocol):
    """Durable platform state. Every method is one transaction."""

    async def open(self) -> None:
        """Create or upgrade the schema, open connections."""

    async def close(self) -> None:
        """Release connections."""

    async def create_device(self, device: Device) -> None:
        """Insert a device and its access token.

        Raises:
            Conflict: the name or the access token is taken.
        """

    async def get_device(self, device_id: str) -> Device | None:
        """The device with this id, or None."""

    async def device_by_name(self, name: str) -> Device | None:
        """The device with this unique name, or None."""

    async def device_by_token(self, access_token: str) -> Device | None:
        """The device whose access token this is, or None."""

    async def list_devices(
        self, offset: int, limit: int, text_search: str | None = None
    ) -> tuple[list[Device], int]:
        """A page of devices ordered by creation time, and the total count."""

    async def update_device(self, device: Device) -> None:
        """Replace name, type and label of an existing device.

        Raises:
            NotFound: no such device.
            Conflict: the new name is taken.
        """

    async def device_by_certificate(self, fingerprint: str) -> Device | None:
        """The device whose X.509 certificate has this SHA-256 fingerprint, or None."""

    async def set_certificate(self, device_id: str, fingerprint: str | None) -> None:
        """Set (or clear, with None) the device's certificate fingerprint.

        Raises:
            NotFound: no such device.
            Conflict: another device has this certificate.
        """

    async def get_basic_credentials(self, device_id: str) -> BasicCredentials | None:
        """The device's MQTT Basic credentials, or None (also for an unknown device)."""

    async def device_by_basic(
        self, client_id: str | None, username: str | None
    ) -> tuple[Device, BasicCredentials] | None:
        """The device whose MQTT Basic credentials have exactly this client id and user
        name (None: not set), with those credentials; or None."""

    async def set_basic_credentials(
        self, device_id: str, credentials: BasicCredentials | None
    ) -> None:
        """Replace (or remove, with None) the device's MQTT Basic credentials.

        Raises:
            NotFound: no such device.
            Conflict: another device has credentials with this client id and user name.
        """

    async def set_access_token(self, device_id: str, access_token: str) -> None:
        """Replace the device's access token.

        Raises:
            NotFound: no such device.
            Conflict: the token is taken by another device.
        """

    async def delete_device(self, device_id: str) -> bool:
        """Delete the device, its credentials and attributes; False when it did not exist."""

    async def get_attributes(
        self, device_id: str, scope: AttributeScope, keys: Sequence[str] | None = None
    ) -> list[Attribute]:
        """Attributes of one scope, sorted by key; all keys when `keys` is None."""

    async def save_attributes(
        self, device_id: str, scope: AttributeScope, values: dict[str, Any], ts: int
    ) -> list[Attribute]:
        """Insert or replace attributes (one transaction); return them with new versions."""

    async def delete_attributes(
        self, device_id: str, scope: AttributeScope, keys: Sequence[str]
    ) -> int:
        """Delete some attributes of one scope; return how many existed."""

    # -- server-side RPC requests (commands/rpc.py) -----------------------------------------

    async def create_rpc(self, record: RpcRecord) -> RpcRecord:
        """Store a new request and return it with its id: the device's next request
        number, never given twice, even after the request was deleted (`record.id` is
        ignored).

        Raises:
            NotFound: no such device.
        """

    async def update_rpcs(self, records: Sequence[RpcRecord]) -> None:
        """Write the status, times, response and error of stored requests (one
        transaction); requests that no longer exist are skipped."""

    async def get_rpc(self, device_id: str, rpc_id: int) -> RpcRecord | None:
        """One request of a device, or None."""

    async def list_rpcs(
        self,
        device_id: str,
        statuses: Sequence[RpcStatus] | None,
        offset: int,
        limit: int,
    ) -> tuple[list[RpcRecord], int]:
        """A page of a device's requests, newest first (only `statuses` if given), and
        the total count."""

    async def open_rpcs(self) -> list[RpcRecord]:
        """Every request not finished (QUEUED, SENT, DELIVERED), by device and id."""

    async def delete_rpc(self, device_id: str, rpc_id: int) -> bool:
        """Delete one request; False when it did not exist."""

    async def due_rpcs(
        self, now: int, after: tuple[int, str, int] | None, limit: int
    ) -> list[RpcRecord]:
        """Up to `limit` open requests whose deadline (`rpc_rows.DEADLINE`) is `now` or
        earlier, ordered by deadline, device and id, after the cursor `after` (deadline,
        device id, id: the last request of the previous page)."""

    async def expire_rpcs(
        self, keys: Sequence[tuple[str, int]], now: int, fencing_token: int | None = None
    ) -> list[RpcRecord]:
        """End those of the requests (device id, id) still open and due at `now`: QUEUED
        → EXPIRED, SENT or DELIVERED → TIMEOUT, `finished_ts = now` (one transaction);
        return them as ended, by device and id.

        Raises:
            IotmeshError: `fencing_token` is older than one this store has seen for the
                RPC housekeeping job (`rpc_rows.RPC_FENCE`); nothing is written.
        """

    async def purge_rpcs(
        self, finished_before: int, limit: int, fencing_token: int | None = None
    ) -> int:
        """Delete up to `limit` requests finished before `finished_before`; return how many.
        A `fencing_token` is checked as by `expire_rpcs`."""

    # -- connectivity (devicestate/connectivity.py) ---------------------------------------

    async def load_activity(self) -> list[DeviceActivity]:
        """What was saved of every device's connectivity."""

    async def save_activity(self, records: Sequence[DeviceActivity]) -> None:
        """Insert or replace these devices' connectivity (one transaction); records of
        devices that no longer exist are skipped."""
