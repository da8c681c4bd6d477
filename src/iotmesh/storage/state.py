"""The state store interface: devices and their credentials (attributes and RPC later).

Implementations: SQLite (`storage/sqlite/state.py`), PostgreSQL later. Unique names and
tokens are enforced by the store, which raises `Conflict` naming the field.
"""

from __future__ import annotations

from typing import Protocol

from iotmesh.core.types import Device


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

    async def set_access_token(self, device_id: str, access_token: str) -> None:
        """Replace the device's access token.

        Raises:
            NotFound: no such device.
            Conflict: the token is taken by another device.
        """

    async def delete_device(self, device_id: str) -> bool:
        """Delete the device and its credentials; False when it did not exist."""
