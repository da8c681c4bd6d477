"""Password hashes for device credentials, with scrypt from the standard library.

The stored form follows the PHC string format: `$scrypt$ln=14,r=8,p=1$<salt>$<hash>`,
salt and hash in unpadded base64. The parameters travel with each hash, so raising the
defaults later leaves every stored hash verifiable.

scrypt with N = 2**14, r = 8 costs about 30 ms and 16 MiB per call. That is
deliberately slow for one guess and cheap enough for one device CONNECT; the registry
runs it on a worker thread and remembers a successful check (see `registry/basic.py`),
so reconnecting devices do not pay it again.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets

SCRYPT_LN = 14  # N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16
HASH_BYTES = 32
_MAX_LN = 20  # refuse to verify hashes that would take gigabytes: not ours


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _scrypt(password: bytes, salt: bytes, ln: int, r: int, p: int, length: int) -> bytes:
    n = 1 << ln
    # OpenSSL refuses unless maxmem covers 128 * r * (N + p + 2) bytes; give it room.
    maxmem = 128 * r * (n + p + 2) + (1 << 20)
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, maxmem=maxmem, dklen=length)


def hash_password(password: bytes) -> str:
    """Hash a password with a fresh random salt; return the PHC string to store."""
    salt = secrets.token_bytes(SALT_BYTES)
    digest = _scrypt(password, salt, SCRYPT_LN, SCRYPT_R, SCRYPT_P, HASH_BYTES)
    params = f"ln={SCRYPT_LN},r={SCRYPT_R},p={SCRYPT_P}"
    return f"$scrypt${params}${_b64(salt)}${_b64(digest)}"


def verify_password(password: bytes, encoded: str) -> bool:
    """Tell whether `password` matches the stored hash (constant-time comparison).

    A malformed or unknown hash matches nothing.
    """
    parts = encoded.split("$")
    if len(parts) != 5 or parts[0] or parts[1] != "scrypt":
        return False
    try:
        params = dict(item.split("=", 1) for item in parts[2].split(","))
        ln, r, p = int(params["ln"]), int(params["r"]), int(params["p"])
        salt, expected = _unb64(parts[3]), _unb64(parts[4])
    except (ValueError, KeyError, binascii.Error):
        return False
    if not (1 <= ln <= _MAX_LN and 1 <= r <= 32 and 1 <= p <= 16 and expected):
        return False
    actual = _scrypt(password, salt, ln, r, p, len(expected))
    return hmac.compare_digest(actual, expected)
