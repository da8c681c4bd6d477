"""Device registry service: create, look up, change and delete devices; check tokens.

Every transport authenticates each device upload by its access token, so
`authenticate` is on the hot path: answers come from a bounded in-memory cache that is
invalidated when a token is rotated or a device deleted (this process is the only
writer of its state store in the all-in-one mode). MQTT Basic logins have their own
cache, in `registry/basic.py`.
"""

from __future__ import annotations

import collections
import hashlib
import re
import ssl

import msgspec

from iotmesh.core.clock import now_ms
from iotmesh.core.errors import AuthError, NotFound, PayloadError
from iotmesh.core.ids import is_uuid, new_access_token, new_id
from iotmesh.core.lifecycle import Service
from iotmesh.core.types import BasicCredentials, Device, DevicePage
from iotmesh.registry.basic import BasicLogins, LoginKey, check_basic
from iotmesh.storage.state import StateStore

# Tokens appear in URL paths (HTTP, CoAP) and as MQTT user names: no '/', '?', '#',
# whitespace or control characters.
_TOKEN_RE = re.compile(r"^[A-Za-z0-9._~\-]{1,128}$")
_MAX_NAME = 255
_CACHE_SIZE = 100_000


def der_fingerprint(der: bytes) -> str:
    """The SHA-256 fingerprint (hex) of a DER certificate, as credentials store it."""
    return hashlib.sha256(der).hexdigest()


def pem_fingerprint(pem: str) -> str:
    """The fingerprint of a PEM certificate.

    Raises:
        PayloadError: not a PEM certificate.
    """
    try:
        der = ssl.PEM_cert_to_DER_cert(pem.strip())
    except ValueError as exc:
        raise PayloadError(f"not a PEM certificate: {exc}") from None
    return der_fingerprint(der)


class DeviceUpdate(msgspec.Struct, omit_defaults=True):
    """The fields of a PATCH; unset fields stay as they are."""

    name: str | msgspec.UnsetType = msgspec.UNSET
    type: str | msgspec.UnsetType = msgspec.UNSET
    label: str | msgspec.UnsetType | None = msgspec.UNSET
    gateway: bool | msgspec.UnsetType = msgspec.UNSET


def _check_name(name: str) -> str:
    name = name.strip()
    if not name or len(name) > _MAX_NAME:
        raise PayloadError(f"device name must be 1 to {_MAX_NAME} characters")
    return name


def _check_token(token: str) -> str:
    if not _TOKEN_RE.match(token):
        raise PayloadError(
            "access token must be 1 to 128 characters of letters, digits and . _ ~ -"
        )
    return token


class DeviceRegistry(Service):
    """Domain logic over a `StateStore`."""

    name = "registry"

    def __init__(self, state: StateStore) -> None:
        self._state = state
        self._by_token: collections.OrderedDict[str, Device] = collections.OrderedDict()
        self._basic = BasicLogins(state, _CACHE_SIZE)

    async def start(self) -> None:
        await self._state.open()

    async def stop(self) -> None:
        await self._state.close()

    async def create(
        self,
        name: str,
        *,
        type: str = "default",
        label: str | None = None,
        access_token: str | None = None,
        gateway: bool = False,
        gateway_id: str | None = None,
    ) -> Device:
        """Register a device; a token is generated when none is given.

        Raises:
            PayloadError: bad name or token.
            Conflict: the name or token is taken.
        """
        device = Device(
            id=new_id(),
            name=_check_name(name),
            type=type.strip() or "default",
            label=label,
            created_ts=now_ms(),
            access_token=_check_token(access_token) if access_token else new_access_token(),
            gateway=gateway,
            gateway_id=gateway_id,
        )
        await self._state.create_device(device)
        return device

    async def get(self, device_id: str) -> Device:
        """The device with this id.

        Raises:
            NotFound: no such device (also for ids that are not UUIDs).
        """
        device = await self._state.get_device(device_id) if is_uuid(device_id) else None
        if device is None:
            raise NotFound(f"device {device_id} does not exist")
        return device

    async def by_name(self, name: str) -> Device | None:
        """The device with this exact name, or None."""
        return await self._state.device_by_name(name)

    async def list(self, page: int, page_size: int, text_search: str | None = None) -> DevicePage:
        """One page (0-based) of devices, oldest first."""
        devices, total = await self._state.list_devices(page * page_size, page_size, text_search)
        return DevicePage(
            data=devices,
            total=total,
            page=page,
            page_size=page_size,
            has_next=(page + 1) * page_size < total,
        )

    async def update(self, device_id: str, update: DeviceUpdate) -> Device:
        """Change name, type or label."""
        device = await self.get(device_id)
        changes = {
            k: v for k, v in msgspec.structs.asdict(update).items() if v is not msgspec.UNSET
        }
        if "name" in changes:
            changes["name"] = _check_name(changes["name"])
        updated = msgspec.structs.replace(device, **changes)
        await self._state.update_device(updated)
        self._forget(device)
        return updated

    async def rotate_token(self, device_id: str, access_token: str | None = None) -> Device:
        """Give the device a new access token (generated when None); the old one stops working."""
        device = await self.get(device_id)
        token = _check_token(access_token) if access_token else new_access_token()
        await self._state.set_access_token(device_id, token)
        self._forget(device)
        return msgspec.structs.replace(device, access_token=token)

    async def set_certificate(self, device_id: str, certificate_pem: str | None) -> Device:
        """Let the device log in with this X.509 certificate (None: remove it).

        Raises:
            PayloadError: the text is not a PEM certificate.
            Conflict: another device uses this certificate.
        """
        device = await self.get(device_id)
        fingerprint = None if certificate_pem is None else pem_fingerprint(certificate_pem)
        await self._state.set_certificate(device_id, fingerprint)
        self._forget(device)
        return msgspec.structs.replace(device, cert_fingerprint=fingerprint)

    async def authenticate_certificate(self, der: bytes) -> Device:
        """The device a client certificate (DER bytes) belongs to.

        Raises:
            AuthError: no device has this certificate.
        """
        device = await self._state.device_by_certificate(der_fingerprint(der))
        if device is None:
            raise AuthError("unknown client certificate")
        return device

    async def delete(self, device_id: str) -> Device:
        """Delete the device; its token stops working at once."""
        device = await self.get(device_id)
        await self._state.delete_device(device_id)
        self._forget(device)
        return device

    def cached(self, access_token: str) -> Device | None:
        """The device of a token if the login cache holds it, without any I/O (None:
        not cached, call `authenticate`). For hot paths that answer from memory."""
        device = self._by_token.get(access_token)
        if device is not None:
            self._by_token.move_to_end(access_token)
        return device

    async def authenticate(self, access_token: str) -> Device:
        """The device that owns this token.

        Raises:
            AuthError: no device has this token.
        """
        device = self._by_token.get(access_token)
        if device is not None:
            self._by_token.move_to_end(access_token)
            return device
        device = await self._state.device_by_token(access_token)
        if device is None:
            raise AuthError("unknown or revoked device access token")
        self._by_token[access_token] = device
        if len(self._by_token) > _CACHE_SIZE:
            self._by_token.popitem(last=False)
        return device

    async def basic_credentials(self, device_id: str) -> BasicCredentials | None:
        """The device's MQTT Basic credentials (None when it has none).

        Raises:
            NotFound: no such device.
        """
        await self.get(device_id)
        return await self._state.get_basic_credentials(device_id)

    async def set_basic_credentials(
        self,
        device_id: str,
        *,
        client_id: str | None = None,
        username: str | None = None,
        password: str | None = None,
    ) -> BasicCredentials:
        """Give the device these MQTT Basic credentials, replacing any it had (the old
        ones stop working at once). The password is stored hashed.

        Raises:
            NotFound: no such device.
            PayloadError: neither client id nor user name, a password without a user
                name, or a bad field.
            Conflict: another device has credentials with this client id and user name.
        """
        client_id, username, password = check_basic(client_id, username, password)
        device = await self.get(device_id)
        password_hash = None if password is None else await self._basic.hash(password)
        credentials = BasicCredentials(client_id, username, password_hash)
        await self._state.set_basic_credentials(device_id, credentials)
        self._forget(device, (client_id, username))
        return credentials

    async def clear_basic_credentials(self, device_id: str) -> None:
        """Remove the device's MQTT Basic credentials (nothing to do when it has none).

        Raises:
            NotFound: no such device.
        """
        device = await self.get(device_id)
        await self._state.set_basic_credentials(device_id, None)
        self._forget(device)

    async def authenticate_basic(
        self, client_id: str | None, username: str | None, password: bytes | None
    ) -> Device | None:
        """The device that MQTT Basic credentials log in as, or None when none fit.

        With a user name: the credentials with this client id and user name, else those
        with this user name and no client id; their password must match (credentials
        without one accept any). Without a user name: the credentials with this client
        id and no user name (ThingsBoard's "client id only"; the password is ignored).

        Raises:
            AuthError: credentials fit, but the password is missing or wrong.
        """
        if username:
            keys: list[LoginKey] = [(client_id, username)] if client_id else []
            keys.append((None, username))
            for key in keys:
                entry = await self._basic.lookup(key)
                if entry is not None:
                    if await self._basic.password_matches(entry, password):
                        return entry.device
                    raise AuthError("wrong password for these MQTT Basic credentials")
            return None
        if client_id:
            entry = await self._basic.lookup((client_id, None))
            return None if entry is None else entry.device
        return None

    def _forget(self, device: Device, *basic_keys: LoginKey) -> None:
        """Drop every cached login of the device (token and MQTT Basic)."""
        self._by_token.pop(device.access_token, None)
        self._basic.forget(device.id, *basic_keys)
