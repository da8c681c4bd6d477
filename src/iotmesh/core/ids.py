"""Identifiers: device ids (UUID), access tokens, and this process's instance id."""

from __future__ import annotations

import secrets
import uuid

_TOKEN_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


def new_id() -> str:
    """Return a new random UUID as text (the form used in URLs and storage)."""
    return str(uuid.uuid4())


SERVICE_NAME = "iotmesh"
"""The service this process runs (`iotmesh run`: all of them), in logs, spans, /metrics."""


def instance_id() -> str:
    """This process's id, new at every start: in log lines, run.json, /metrics and the
    `service.instance.id` of spans, so that what one process said can be told apart from
    its restarts and from other replicas."""
    return _INSTANCE_ID


def new_access_token(length: int = 20) -> str:
    """Return a random ThingsBoard-style access token (alphanumeric, 20 characters)."""
    return "".join(secrets.choice(_TOKEN_ALPHABET) for _ in range(length))


def is_uuid(text: str) -> bool:
    """Tell whether `text` is a UUID in any of the forms `uuid.UUID` accepts."""
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


_INSTANCE_ID = new_id()
