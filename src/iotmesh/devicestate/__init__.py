"""Device state shared by every transport: attributes in three scopes, and their push."""

from iotmesh.devicestate.attributes import AttributeService, SharedListener

__all__ = ["AttributeService", "SharedListener"]
