"""The HTTP API: REST for users (admin token) and the ThingsBoard device HTTP API."""

from iotmesh.api.app import create_app, create_asgi_app
from iotmesh.api.context import ApiContext

__all__ = ["ApiContext", "create_app", "create_asgi_app"]
