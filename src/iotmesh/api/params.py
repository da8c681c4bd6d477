"""Query parameters shared by several routers."""

from __future__ import annotations

from iotmesh.core.errors import PayloadError
from iotmesh.proto.thingsboard import split_keys


def query_keys(keys: str | None) -> list[str] | None:
    """`keys=a,b` as a list; None when the parameter is absent.

    Raises:
        PayloadError: the parameter is present but names no key (`keys=`), which would
            otherwise silently mean "nothing" or "everything".
    """
    parsed = split_keys(keys)
    if parsed is not None and not parsed:
        raise PayloadError("keys: give at least one key, or leave the parameter out")
    return parsed
