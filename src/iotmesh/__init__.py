"""iotmesh: an open-source IoT platform.

Devices connect over MQTT, CoAP and HTTP(/2) with the ThingsBoard device API; their data
moves through a bus and a pipeline into time-series storage. The same code runs as one
process (`iotmesh run`) or as microservices (`iotmesh serve SERVICE`).
"""

from iotmesh.core.errors import IotmeshError
from iotmesh.core.settings import Settings

__version__ = "0.1.0"
__all__ = ["IotmeshError", "Settings", "__version__"]
