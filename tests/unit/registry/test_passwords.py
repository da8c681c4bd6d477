"""Password hashes: scrypt in PHC form, salted per hash, verified in constant time."""

from __future__ import annotations

import base64
import hashlib

import pytest

from iotmesh.registry.passwords import hash_password, verify_password


def test_hash_verifies_its_password_only() -> None:
    stored = hash_password(b"s3cret")
    assert stored.startswith("$scrypt$ln=14,r=8,p=1$")
    assert "s3cret" not in stored
    assert verify_password(b"s3cret", stored)
    assert not verify_password(b"s3cret ", stored)
    assert not verify_password(b"", stored)


def test_each_hash_has_its_own_salt() -> None:
    first, second = hash_password(b"same"), hash_password(b"same")
    assert first != second
    assert verify_password(b"same", first)
    assert verify_password(b"same", second)


def test_other_parameters_still_verify() -> None:
    """The parameters travel with the hash: changing the defaults keeps old hashes."""
    salt = b"0123456789abcdef"
    digest = hashlib.scrypt(b"pw", salt=salt, n=2**10, r=4, p=1, dklen=24)

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode().rstrip("=")

    stored = f"$scrypt$ln=10,r=4,p=1${b64(salt)}${b64(digest)}"
    assert verify_password(b"pw", stored)
    assert not verify_password(b"px", stored)


@pytest.mark.parametrize(
    "stored",
    [
        "",
        "s3cret",
        "$pbkdf2$ln=10,r=8,p=1$c2FsdA$aGFzaA",
        "$scrypt$ln=10,r=8$c2FsdA$aGFzaA",
        "$scrypt$ln=x,r=8,p=1$c2FsdA$aGFzaA",
        "$scrypt$ln=40,r=8,p=1$c2FsdA$aGFzaA",
        "$scrypt$ln=10,r=8,p=1$not base64!$aGFzaA",
        "$scrypt$ln=10,r=8,p=1$c2FsdA$",
    ],
)
def test_malformed_hashes_match_nothing(stored: str) -> None:
    assert not verify_password(b"s3cret", stored)
