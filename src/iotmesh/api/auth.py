"""Admin authentication of the REST API: `Authorization: Bearer <admin token>`."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request

from iotmesh.api.context import ApiContext, context
from iotmesh.core.errors import AuthError


async def require_admin(request: Request, ctx: Annotated[ApiContext, Depends(context)]) -> None:
    """FastAPI dependency that refuses requests without the admin bearer token."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise AuthError("missing admin credentials: send 'Authorization: Bearer <admin token>'")
    if not secrets.compare_digest(token.strip().encode(), ctx.admin_token.encode()):
        raise AuthError("wrong admin token")
