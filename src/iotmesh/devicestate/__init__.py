"""Device state shared by every transport: attributes in three scopes and their push,
the twin view of them, connectivity (online, transport, last activity). Server-side
RPC, the third part of device state, lives in `commands/rpc.py`."""

from iotmesh.devicestate.attributes import AttributeService, SharedListener, Twin, TwinValue
from iotmesh.devicestate.connectivity import Connectivity, ConnectivityService

__all__ = [
    "AttributeService",
    "Connectivity",
    "ConnectivityService",
    "SharedListener",
    "Twin",
    "TwinValue",
]
