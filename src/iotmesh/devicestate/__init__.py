"""Device state shared by every transport: attributes in three scopes and their push,
connectivity (online, transport, last activity)."""

from iotmesh.devicestate.attributes import AttributeService, SharedListener
from iotmesh.devicestate.connectivity import Connectivity, ConnectivityService

__all__ = ["AttributeService", "Connectivity", "ConnectivityService", "SharedListener"]
