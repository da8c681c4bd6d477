"""Who a CONNECT logs in as: the order of certificate, MQTT Basic, token and client id,
and the reason code of each refusal (over a real registry on SQLite)."""

from __future__ import annotations

import datetime
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from iotmesh.proto.mqtt import Connect, ReasonCode
from iotmesh.registry import DeviceRegistry
from iotmesh.storage.sqlite.state import SqliteStateStore
from iotmesh.transports.mqtt.auth import LoginRefused, authenticate


def certificate() -> tuple[str, bytes]:
    """A fresh self-signed certificate: (PEM, DER)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "device")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    return pem, cert.public_bytes(serialization.Encoding.DER)


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[DeviceRegistry]:
    reg = DeviceRegistry(SqliteStateStore(tmp_path / "state.db", synchronous="OFF"))
    await reg.start()
    try:
        yield reg
    finally:
        await reg.stop()


async def login(
    registry: DeviceRegistry,
    client_id: str = "",
    username: str | None = None,
    password: bytes | None = None,
    *,
    cert: bytes | None = None,
    anonymous: bool = False,
) -> str | None:
    """The id of the device the CONNECT logs in as (None: anonymous)."""
    connect = Connect(client_id=client_id, username=username, password=password)
    principal = await authenticate(connect, registry, anonymous, cert)
    return None if principal.device is None else principal.device.id


async def refused(
    registry: DeviceRegistry,
    client_id: str = "",
    username: str | None = None,
    password: bytes | None = None,
    *,
    cert: bytes | None = None,
    anonymous: bool = False,
) -> int:
    with pytest.raises(LoginRefused) as info:
        await login(registry, client_id, username, password, cert=cert, anonymous=anonymous)
    return info.value.reason


async def test_username_and_password_before_token(registry: DeviceRegistry) -> None:
    basic = await registry.create("basic")
    token_owner = await registry.create("token", access_token="same-name")
    await registry.set_basic_credentials(basic.id, username="same-name", password="pw")

    assert await login(registry, "c", "same-name", b"pw") == basic.id
    # No password: the user name is a token first.
    assert await login(registry, "c", "same-name") == token_owner.id
    # A password that does not match is refused, not tried as a token.
    assert await refused(registry, "c", "same-name", b"nope") == (
        ReasonCode.BAD_USER_NAME_OR_PASSWORD
    )


async def test_token_with_any_password_still_works(registry: DeviceRegistry) -> None:
    device = await registry.create("d", access_token="TOKEN1")
    for password in (None, b"", b"ignored"):
        assert await login(registry, "any", "TOKEN1", password) == device.id


async def test_username_without_password(registry: DeviceRegistry) -> None:
    open_device = await registry.create("open")
    closed = await registry.create("closed")
    await registry.set_basic_credentials(open_device.id, username="open-user")
    await registry.set_basic_credentials(closed.id, username="closed-user", password="pw")
    assert await login(registry, "", "open-user") == open_device.id
    assert await refused(registry, "", "closed-user") == ReasonCode.BAD_USER_NAME_OR_PASSWORD


async def test_client_id_only_comes_last(registry: DeviceRegistry) -> None:
    by_client = await registry.create("by-client")
    by_token = await registry.create("by-token", access_token="TOKEN2")
    await registry.set_basic_credentials(by_client.id, client_id="cid")
    for username, password in ((None, None), ("not-a-token", None), ("x", b"y")):
        found = await login(registry, "cid", username, password)
        assert found == by_client.id, username
    assert await login(registry, "cid", "TOKEN2") == by_token.id


async def test_unknown_logins_are_not_authorized(registry: DeviceRegistry) -> None:
    await registry.create("d", access_token="TOKEN3")
    assert await refused(registry, "c", "unknown") == ReasonCode.NOT_AUTHORIZED
    assert await refused(registry, "c", "unknown", b"pw") == ReasonCode.NOT_AUTHORIZED
    assert await refused(registry, "unknown-client") == ReasonCode.NOT_AUTHORIZED
    assert await refused(registry, "") == ReasonCode.NOT_AUTHORIZED
    assert await login(registry, "unknown-client", anonymous=True) is None


async def test_certificate_first_and_unknown_ones_never_anonymous(
    registry: DeviceRegistry,
) -> None:
    pem, der = certificate()
    by_cert = await registry.create("by-cert")
    by_client = await registry.create("by-client", access_token="TOKEN4")
    await registry.set_certificate(by_cert.id, pem)
    await registry.set_basic_credentials(by_client.id, client_id="cid")
    assert await login(registry, "cid", "TOKEN4", cert=der) == by_cert.id

    _, other_der = certificate()
    # An unknown certificate: the other ways are still tried...
    assert await login(registry, "cid", cert=other_der) == by_client.id
    assert await login(registry, "", "TOKEN4", cert=other_der) == by_client.id
    # ... but never end in an anonymous login.
    assert await refused(registry, "", cert=other_der, anonymous=True) == (
        ReasonCode.NOT_AUTHORIZED
    )
