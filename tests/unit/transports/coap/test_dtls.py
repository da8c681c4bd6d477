"""transports/coap/dtls: the PSK identity of a ClientKeyExchange, identities as device
ids, and the per-request check of a DTLS session against the registry."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iotmesh.core.errors import AuthError
from iotmesh.transports.coap.dtls import PskClaim, device_id_of, psk_identity, session_device


def record(kind: int, epoch: int, body: bytes) -> bytes:
    return (
        bytes([kind])
        + b"\xfe\xfd"
        + epoch.to_bytes(2, "big")
        + bytes(6)
        + (len(body).to_bytes(2, "big") + body)
    )


def client_key_exchange(identity: bytes, offset: int = 0) -> bytes:
    body = len(identity).to_bytes(2, "big") + identity
    head = bytes([16]) + len(body).to_bytes(3, "big") + b"\x00\x02"
    return head + offset.to_bytes(3, "big") + len(body).to_bytes(3, "big") + body


def test_identity_of_a_client_key_exchange() -> None:
    cke = record(22, 0, client_key_exchange(b"abc"))
    assert psk_identity(cke) == "abc"
    ccs = record(20, 0, b"\x01")
    assert psk_identity(ccs + cke) == "abc"  # not first in the datagram
    assert psk_identity(ccs) is None
    assert psk_identity(record(22, 1, client_key_exchange(b"abc"))) is None  # encrypted
    assert psk_identity(record(22, 0, client_key_exchange(b"abc", offset=5))) is None
    assert psk_identity(record(22, 0, b"\x01" + bytes(20))) is None  # a ClientHello


@given(st.binary(max_size=100))
def test_any_datagram_gives_an_identity_or_none(data: bytes) -> None:
    assert psk_identity(data) is None or isinstance(psk_identity(data), str)


def test_identities_are_device_ids_without_dashes() -> None:
    device_id = str(uuid.uuid4())
    assert device_id_of(device_id.replace("-", "")) == device_id
    assert device_id_of(device_id) is None  # 36 bytes: over tinydtls's 32
    assert device_id_of("x" * 32) is None


class Registry:
    def __init__(self, devices: dict[str, Any]) -> None:
        self.devices = devices

    def cached(self, token: str) -> Any:
        return None

    async def authenticate(self, token: str) -> Any:
        if token not in self.devices:
            raise AuthError("unknown")
        return self.devices[token]


class Device:
    def __init__(self, device_id: str) -> None:
        self.id = device_id


async def test_session_device_is_checked_each_request() -> None:
    registry: Any = Registry({"tok": Device("d1")})
    assert (await session_device(registry, [PskClaim("d1", "tok")])).id == "d1"
    with pytest.raises(AuthError):
        await session_device(registry, [None])  # no session
    with pytest.raises(AuthError):
        await session_device(registry, [PskClaim("d1", "rotated-away")])
    registry.devices["tok"] = Device("d2")  # the token now belongs to another device
    with pytest.raises(AuthError):
        await session_device(registry, [PskClaim("d1", "tok")])
