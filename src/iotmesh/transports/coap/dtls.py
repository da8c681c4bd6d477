"""CoAP over DTLS 1.2 with pre-shared keys (coaps), on aiocoap's tinydtls server.

Credentials: the PSK identity is the device's id written as 32 hex digits, without
dashes (public: it travels in clear in the handshake; tinydtls takes identities of
at most 32 bytes, a dashed UUID has 36), the key is the device's access token as
UTF-8 (secret: never sent). tinydtls takes keys of at most 16 bytes, so only devices
whose token is that short (`iotmesh device create NAME --token T`; generated tokens
have 20 characters) can use DTLS; others are refused in the handshake. So a
device needs nothing new; the token in the request path may then be left out:
`coaps://host/api/v1/telemetry` (as ThingsBoard's X.509 form).

The key lookup: tinydtls asks for the key synchronously, inside the handshake, while
devices live in the state store behind an async API. So the handshake reads a small
in-memory cache (`PskKeys`), and a ClientKeyExchange whose identity is not in it is
dropped before tinydtls sees it (with the rest of its flight) while the device is
fetched; the client sends the flight again after its retransmission timer (1 s in
OpenSSL, GnuTLS and tinydtls), and then the key is there. Cache entries live
`KEY_TTL_S`, so a rotated or deleted token stops opening sessions within that time;
every request over a session is also checked against the registry
(`session_device`), so it stops being served at once.

Resource handling: our own socket (no SO_REUSEPORT; port 0 allowed), at most
`coap.max_dtls_sessions` sessions (the oldest is closed to make room), aiocoap's
session objects are closed at shutdown. aiocoap calls this backend "highly
experimental"; see docs/device-api.md for what it cannot do (no X.509, no
any-address).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import uuid
from typing import Any

import msgspec

from iotmesh.core.errors import AuthError, NotFound, StartupError
from iotmesh.core.types import Device
from iotmesh.registry.service import DeviceRegistry

log = logging.getLogger(__name__)

KEY_TTL_S = 10.0
MAX_KEY_BYTES = 16  # tinydtls's DTLS_PSK_MAX_KEY_LEN
MAX_KEYS = 10_000
_HANDSHAKE, _CLIENT_KEY_EXCHANGE = 22, 16


class PskClaim(msgspec.Struct, frozen=True):
    """Who a DTLS session authenticated as: the device id and the token used as key."""

    device_id: str
    token: str


class PskKeys:
    """The PSK lookup tinydtls calls (`find_dtls_psk`), over a cache filled async."""

    def __init__(self, registry: DeviceRegistry) -> None:
        self.registry = registry
        self._keys: dict[str, tuple[float, str]] = {}  # device id -> (expiry, token)
        self._fetching: dict[str, asyncio.Task[None]] = {}

    def find_dtls_psk(self, identity: bytes) -> tuple[bytes, PskClaim]:
        """The key and claim of a PSK identity (raises KeyError: unknown, for now)."""
        device_id = device_id_of(identity.decode("utf-8", "replace"))
        entry = None if device_id is None else self._keys.get(device_id)
        if entry is None or entry[0] < time.monotonic() or len(entry[1]) > MAX_KEY_BYTES:
            raise KeyError(device_id)
        assert device_id is not None
        return entry[1].encode(), PskClaim(device_id, entry[1])

    def known(self, identity: str) -> bool:
        """Whether a handshake of this identity can go on now; if not, fetch its key.
        True for an identity that is no device id at all: tinydtls refuses it."""
        device_id = device_id_of(identity)
        if device_id is None:
            return True
        entry = self._keys.get(device_id)
        if entry is not None and entry[0] >= time.monotonic():
            return True
        if device_id not in self._fetching and len(self._fetching) < 1000:
            self._fetching[device_id] = asyncio.create_task(
                self._fetch(device_id), name="coap.dtls-key"
            )
        return False

    async def _fetch(self, device_id: str) -> None:
        try:
            device = await self.registry.get(device_id)
        except NotFound:
            self._keys.pop(device_id, None)
            return
        finally:
            self._fetching.pop(device_id, None)
        if len(self._keys) >= MAX_KEYS:
            now = time.monotonic()
            self._keys = {k: v for k, v in self._keys.items() if v[0] >= now}
            if len(self._keys) >= MAX_KEYS:
                self._keys.clear()
        self._keys[device_id] = (time.monotonic() + KEY_TTL_S, device.access_token)

    def close(self) -> None:
        for task in self._fetching.values():
            task.cancel()
        self._fetching.clear()


def device_id_of(identity: str) -> str | None:
    """The device id (canonical UUID text) a PSK identity names, or None."""
    if len(identity) != 32:
        return None
    try:
        return str(uuid.UUID(hex=identity))
    except ValueError:
        return None


def psk_identity(datagram: bytes) -> str | None:
    """The PSK identity of a plaintext DTLS ClientKeyExchange in `datagram`, else None.

    Records: type(1) version(2) epoch(2) sequence(6) length(2); a handshake message:
    type(1) length(3) message_seq(2) fragment_offset(3) fragment_length(3); a PSK
    ClientKeyExchange body: identity length(2), identity (RFC 4279 §2).
    """
    pos = 0
    while pos + 13 <= len(datagram):
        kind = datagram[pos]
        epoch = int.from_bytes(datagram[pos + 3 : pos + 5], "big")
        length = int.from_bytes(datagram[pos + 11 : pos + 13], "big")
        body = datagram[pos + 13 : pos + 13 + length]
        pos += 13 + length
        if kind != _HANDSHAKE or epoch != 0 or len(body) < 14 or body[0] != _CLIENT_KEY_EXCHANGE:
            continue
        if int.from_bytes(body[6:9], "big") != 0:
            continue  # a later fragment: the identity is in the first one
        size = int.from_bytes(body[12:14], "big")
        if 14 + size <= len(body):
            return body[14 : 14 + size].decode("utf-8", "replace")
    return None


async def session_device(registry: DeviceRegistry, claims: list[Any]) -> Device:
    """The device of a DTLS session, checked against the registry now.

    Raises:
        AuthError: no PSK session, or its token was rotated or its device deleted.
    """
    claim = next((c for c in claims if isinstance(c, PskClaim)), None)
    if claim is None:
        raise AuthError("no access token in the path and no DTLS session")
    device = registry.cached(claim.token) or await registry.authenticate(claim.token)
    if device.id != claim.device_id:
        raise AuthError("the DTLS session's key is no longer this device's token")
    return device


async def start_dtls(context: Any, sock: socket.socket, keys: PskKeys, max_sessions: int) -> Any:
    """Serve coaps on `sock` (bound) in aiocoap `context`; returns the transport."""
    try:
        import DTLSSocket  # noqa: F401
        from aiocoap.transports import tinydtls_server as td
    except ImportError as exc:
        sock.close()
        raise StartupError(
            "coap.dtls_port needs the DTLSSocket package (pip install 'iotmesh[dtls]';"
            " building it needs autoconf, automake and libtool)"
        ) from exc

    waiting: dict[Any, str] = {}  # client address -> identity whose key is being fetched

    class Sessions(td._DatagramServerSocketSimpleDTLS):  # type: ignore[misc]
        max_sockets = max_sessions

        @classmethod
        async def create_on(cls, message_interface: Any) -> Any:
            loop = asyncio.get_running_loop()
            ready = loop.create_future()
            wrapped = td.GoingThroughMessageDecryption(message_interface)
            await loop.create_datagram_endpoint(
                lambda: cls(ready.set_result, wrapped, context.log), sock=sock
            )
            protocol = await ready
            host, port = sock.getsockname()[:2]
            protocol.hostinfo_local = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            protocol._loop = loop
            protocol._server_credentials = keys
            return protocol

        def datagram_received(self, data: bytes, sockaddr: Any) -> None:
            identity = psk_identity(data)
            if identity is not None and not keys.known(identity):
                # Dropped, with the rest of the flight (ChangeCipherSpec, Finished:
                # separate datagrams), until the client sends the flight again.
                waiting[sockaddr] = identity
                return
            if sockaddr in waiting:
                if identity is None:
                    return
                del waiting[sockaddr]
            if sockaddr not in self._connections:
                self._maybe_purge_sockets()
            super().datagram_received(data, sockaddr)

    class Transport(td.MessageInterfaceTinyDTLSServer):  # type: ignore[misc]
        @classmethod
        async def create_on(cls, mman: Any) -> Any:
            self = cls(mman, context.log, asyncio.get_running_loop())
            self._pool = await Sessions.create_on(self)
            return self

    await context._append_tokenmanaged_messagemanaged_transport(Transport.create_on)
    return context.request_interfaces[-1].token_interface.message_interface
