"""MQTT Basic credentials: the checks on what an admin sets, and the login cache.

A device may have one set of MQTT Basic credentials, as in ThingsBoard: an optional
client id, an optional user name and an optional password (which needs a user name).
A client matches them by the exact (client id, user name) pair, where credentials
without a client id match any client id.

Logins are on the CONNECT path, so `BasicLogins` answers from a bounded cache keyed by
that pair, negative answers included; every change of a device's credentials (and of
the device) invalidates its entries. The password hash is slow on purpose
(`passwords.py`): it runs on a worker thread, at most `_HASHING` at a time, and a
successful check is remembered as an HMAC under a per-process random key, so a device
that reconnects with the same password is let in without hashing again.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
import secrets

from iotmesh.core.errors import PayloadError
from iotmesh.core.types import BasicCredentials, Device
from iotmesh.registry.passwords import hash_password, verify_password
from iotmesh.storage.state import StateStore

_MAX_FIELD = 255
_HASHING = 2  # concurrent scrypt calls: each takes 16 MiB and one core for ~30 ms

LoginKey = tuple[str | None, str | None]  # (client id, user name); None: not set


def _check_field(what: str, value: str | None) -> str | None:
    if value is None:
        return None
    if not 1 <= len(value) <= _MAX_FIELD:
        raise PayloadError(f"{what} must be 1 to {_MAX_FIELD} characters (leave it out for none)")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        raise PayloadError(f"{what} must not contain control characters")
    return value


def check_basic(
    client_id: str | None, username: str | None, password: str | None
) -> tuple[str | None, str | None, str | None]:
    """Validate MQTT Basic credentials as an admin gives them.

    Raises:
        PayloadError: no client id and no user name, a password without a user name,
            or a field that is empty, too long or holds control characters.
    """
    client_id = _check_field("client_id", client_id)
    username = _check_field("username", username)
    password = _check_field("password", password)
    if client_id is None and username is None:
        raise PayloadError("MQTT Basic credentials need a client_id, a username, or both")
    if password is not None and username is None:
        raise PayloadError("a password needs a username (MQTT sends no password without one)")
    return client_id, username, password


class _Entry:
    """A cached login: the device, its credentials, and the last password that passed."""

    __slots__ = ("credentials", "device", "verified")

    def __init__(self, device: Device, credentials: BasicCredentials) -> None:
        self.device = device
        self.credentials = credentials
        self.verified: bytes | None = None


class BasicLogins:
    """Looks up and checks MQTT Basic logins, with a bounded cache."""

    def __init__(self, state: StateStore, cache_size: int) -> None:
        self._state = state
        self._size = cache_size
        self._cache: collections.OrderedDict[LoginKey, _Entry | None] = collections.OrderedDict()
        self._key_of: dict[str, LoginKey] = {}  # device id -> key of its cached entry
        self._generation = 0  # bumped by every invalidation; stale lookups are not cached
        self._pepper = secrets.token_bytes(32)
        self._hashing = asyncio.Semaphore(_HASHING)

    async def hash(self, password: str) -> str:
        """The hash to store for a password (on a worker thread)."""
        async with self._hashing:
            return await asyncio.to_thread(hash_password, password.encode())

    async def lookup(self, key: LoginKey) -> _Entry | None:
        """The device whose credentials have exactly this (client id, user name)."""
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        generation = self._generation
        found = await self._state.device_by_basic(*key)
        entry = None if found is None else _Entry(*found)
        if generation == self._generation:
            self._cache[key] = entry
            if entry is not None:
                self._key_of[entry.device.id] = key
            if len(self._cache) > self._size:
                _, evicted = self._cache.popitem(last=False)
                if evicted is not None:
                    self._key_of.pop(evicted.device.id, None)
        return entry

    async def password_matches(self, entry: _Entry, password: bytes | None) -> bool:
        """Check a CONNECT's password against the entry's credentials."""
        stored = entry.credentials.password_hash
        if stored is None:
            return True  # credentials without a password accept any (ThingsBoard)
        if password is None:
            return False
        mac = hmac.new(self._pepper, password, hashlib.sha256).digest()
        if entry.verified is not None and hmac.compare_digest(mac, entry.verified):
            return True
        async with self._hashing:
            ok = await asyncio.to_thread(verify_password, password, stored)
        if ok:
            entry.verified = mac
        return ok

    def forget(self, device_id: str, *keys: LoginKey) -> None:
        """Drop the device's cached login and any cached answer for `keys`."""
        self._generation += 1
        key = self._key_of.pop(device_id, None)
        if key is not None:
            self._cache.pop(key, None)
        for key in keys:
            entry = self._cache.pop(key, None)
            if entry is not None:
                self._key_of.pop(entry.device.id, None)
