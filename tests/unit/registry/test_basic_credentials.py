"""MQTT Basic credentials in the registry, over a real SQLite state store."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from iotmesh.core.errors import AuthError, Conflict, NotFound, PayloadError
from iotmesh.registry import DeviceRegistry, DeviceUpdate
from iotmesh.storage.sqlite.state import SqliteStateStore

MISSING = "5f0e6f6a-3c53-4a56-9d1c-7d1d2b5a0099"


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[DeviceRegistry]:
    reg = DeviceRegistry(SqliteStateStore(tmp_path / "state.db", synchronous="OFF"))
    await reg.start()
    try:
        yield reg
    finally:
        await reg.stop()


async def test_username_and_password(registry: DeviceRegistry, tmp_path: Path) -> None:
    device = await registry.create("d1")
    creds = await registry.set_basic_credentials(device.id, username="user", password="pw")
    assert creds.client_id is None
    assert creds.username == "user"
    assert creds.password_hash is not None
    assert creds.password_hash.startswith("$scrypt$")
    assert await registry.basic_credentials(device.id) == creds

    found = await registry.authenticate_basic("any-client", "user", b"pw")
    assert found is not None
    assert found.id == device.id
    assert await registry.authenticate_basic(None, "user", b"pw") == found
    with pytest.raises(AuthError, match="wrong password"):
        await registry.authenticate_basic("any-client", "user", b"PW")
    with pytest.raises(AuthError):
        await registry.authenticate_basic("any-client", "user", None)
    assert await registry.authenticate_basic("any-client", "nobody", b"pw") is None

    # The password is nowhere in the database in clear.
    dump = "\n".join(sqlite3.connect(tmp_path / "state.db").iterdump())
    assert "'pw'" not in dump
    assert creds.password_hash in dump


async def test_client_id_with_username_must_both_match(registry: DeviceRegistry) -> None:
    device = await registry.create("d1")
    await registry.set_basic_credentials(device.id, client_id="c1", username="user", password="pw")
    found = await registry.authenticate_basic("c1", "user", b"pw")
    assert found is not None
    assert found.id == device.id
    assert await registry.authenticate_basic("c2", "user", b"pw") is None
    assert await registry.authenticate_basic(None, "user", b"pw") is None
    # Client id with a user name is not a client-id-only login.
    assert await registry.authenticate_basic("c1", None, None) is None


async def test_client_id_only(registry: DeviceRegistry) -> None:
    device = await registry.create("d1")
    await registry.set_basic_credentials(device.id, client_id="only-client")
    found = await registry.authenticate_basic("only-client", None, None)
    assert found is not None
    assert found.id == device.id
    assert await registry.authenticate_basic("other", None, None) is None
    assert await registry.authenticate_basic(None, None, None) is None


async def test_username_without_password_accepts_any(registry: DeviceRegistry) -> None:
    device = await registry.create("d1")
    await registry.set_basic_credentials(device.id, username="open")
    for password in (None, b"", b"whatever"):
        found = await registry.authenticate_basic("c", "open", password)
        assert found is not None
        assert found.id == device.id


async def test_exact_client_id_wins_over_username_only(registry: DeviceRegistry) -> None:
    with_client = await registry.create("with-client")
    username_only = await registry.create("username-only")
    await registry.set_basic_credentials(
        with_client.id, client_id="c1", username="shared", password="a"
    )
    await registry.set_basic_credentials(username_only.id, username="shared", password="b")
    first = await registry.authenticate_basic("c1", "shared", b"a")
    second = await registry.authenticate_basic("c2", "shared", b"b")
    assert (first and first.id, second and second.id) == (with_client.id, username_only.id)
    with pytest.raises(AuthError):  # c1 picks the first device, whose password is "a"
        await registry.authenticate_basic("c1", "shared", b"b")


async def test_pairs_are_unique(registry: DeviceRegistry) -> None:
    first = await registry.create("first")
    second = await registry.create("second")
    await registry.set_basic_credentials(first.id, client_id="c", username="u", password="x")
    with pytest.raises(Conflict, match="client id and user name"):
        await registry.set_basic_credentials(second.id, client_id="c", username="u")
    await registry.set_basic_credentials(first.id, client_id="k")  # replaces c/u
    with pytest.raises(Conflict):
        await registry.set_basic_credentials(second.id, client_id="k")
    await registry.set_basic_credentials(second.id, client_id="c", username="u")  # now free
    # The same user name with another client id, or none, is another login.
    await registry.set_basic_credentials(first.id, client_id="c2", username="u")
    await registry.set_basic_credentials(first.id, username="u")
    assert await registry.basic_credentials(first.id) is not None


@pytest.mark.parametrize(
    ("client_id", "username", "password", "message"),
    [
        (None, None, None, "need a client_id, a username"),
        (None, None, "pw", "need a client_id, a username"),
        ("c", None, "pw", "password needs a username"),
        ("", "u", None, "client_id must be 1 to"),
        (None, "u" * 256, None, "username must be 1 to"),
        (None, "u", "", "password must be 1 to"),
        (None, "bad\nname", None, "control characters"),
    ],
)
async def test_bad_credentials_are_refused(
    registry: DeviceRegistry,
    client_id: str | None,
    username: str | None,
    password: str | None,
    message: str,
) -> None:
    device = await registry.create("d1")
    with pytest.raises(PayloadError, match=message):
        await registry.set_basic_credentials(
            device.id, client_id=client_id, username=username, password=password
        )


async def test_unknown_device(registry: DeviceRegistry) -> None:
    with pytest.raises(NotFound):
        await registry.set_basic_credentials(MISSING, username="u")
    with pytest.raises(NotFound):
        await registry.basic_credentials(MISSING)
    with pytest.raises(NotFound):
        await registry.clear_basic_credentials(MISSING)


async def test_changes_invalidate_cached_logins(registry: DeviceRegistry) -> None:
    device = await registry.create("d1")
    await registry.set_basic_credentials(device.id, client_id="c", username="u", password="old")
    assert await registry.authenticate_basic("c", "u", b"old") is not None  # now cached
    assert await registry.authenticate_basic("c", "new-user", b"new") is None  # cached miss

    await registry.set_basic_credentials(
        device.id, client_id="c", username="new-user", password="new"
    )
    assert await registry.authenticate_basic("c", "u", b"old") is None
    found = await registry.authenticate_basic("c", "new-user", b"new")
    assert found is not None

    await registry.set_basic_credentials(
        device.id, client_id="c", username="new-user", password="newer"
    )
    with pytest.raises(AuthError):
        await registry.authenticate_basic("c", "new-user", b"new")

    # A renamed device is seen renamed; a gateway flag change matters for the ACL.
    await registry.update(device.id, DeviceUpdate(name="renamed", gateway=True))
    found = await registry.authenticate_basic("c", "new-user", b"newer")
    assert found is not None
    assert (found.name, found.gateway) == ("renamed", True)

    await registry.clear_basic_credentials(device.id)
    assert await registry.basic_credentials(device.id) is None
    assert await registry.authenticate_basic("c", "new-user", b"newer") is None


async def test_deleting_the_device_ends_its_logins(registry: DeviceRegistry) -> None:
    device = await registry.create("d1")
    await registry.set_basic_credentials(device.id, client_id="gone")
    assert await registry.authenticate_basic("gone", None, None) is not None
    await registry.delete(device.id)
    assert await registry.authenticate_basic("gone", None, None) is None
    # The pair is free again.
    other = await registry.create("d2")
    await registry.set_basic_credentials(other.id, client_id="gone")


async def test_remembered_password_is_only_that_password(registry: DeviceRegistry) -> None:
    """The fast path for a reconnect never lets another password through."""
    device = await registry.create("d1")
    await registry.set_basic_credentials(device.id, username="u", password="right")
    for _ in range(3):
        assert await registry.authenticate_basic(None, "u", b"right") is not None
    with pytest.raises(AuthError):
        await registry.authenticate_basic(None, "u", b"wrong")
    assert await registry.authenticate_basic(None, "u", b"right") is not None
