"""The error tree of iotmesh.

Every error the platform raises on purpose derives from `IotmeshError`, so callers can
catch one root. The HTTP layer maps each leaf to a status code in one place
(`iotmesh.api.problems`); transports map them to their own codes.

    IotmeshError
    ├── ConfigError            settings that cannot be used (exit at start-up)
    ├── StartupError           a resource the process needs is unavailable (port, data dir)
    ├── PayloadError           a device or user sent data we cannot accept (remote's fault)
    │   └── PayloadTooLarge    ... because it is over the configured size limit
    ├── AuthError              missing or wrong credentials
    ├── NotFound               the named device (or other object) does not exist
    ├── Conflict               a unique name or token is already taken
    ├── Overloaded             back-pressure: try again later (HTTP 503, CoAP 5.03, MQTT 0x97)
    ├── DeviceTimeout          a device did not answer in time (HTTP 504)
    ├── DeviceGone             a device's session cannot take a message any more
    └── StorageError           the storage backend failed (local fault)
"""

from __future__ import annotations


class IotmeshError(Exception):
    """Root of all iotmesh errors."""


class ConfigError(IotmeshError):
    """The settings cannot be used; raised before anything starts."""


class StartupError(IotmeshError):
    """A resource the process needs at start-up is unavailable (port in use, data dir)."""


class PayloadError(IotmeshError):
    """The remote side sent data we cannot accept (malformed JSON, bad types)."""


class PayloadTooLarge(PayloadError):
    """The payload is larger than the configured limit."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"payload of {size} bytes is over the limit of {limit} bytes")
        self.size = size
        self.limit = limit


class AuthError(IotmeshError):
    """Credentials are missing or wrong."""


class NotFound(IotmeshError):
    """The named object does not exist."""


class Conflict(IotmeshError):
    """A unique value (device name, access token) is already taken."""


class Overloaded(IotmeshError):
    """The platform is pushing back; the caller should retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DeviceTimeout(IotmeshError):
    """A device did not answer (or was not reachable) within the allowed time."""


class DeviceGone(IotmeshError):
    """The live session meant to reach a device can no longer deliver to it."""


class StorageError(IotmeshError):
    """The storage backend failed; the fault is local, not the caller's."""
