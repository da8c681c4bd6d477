"""iotmesh: an open-source IoT platform.

Devices connect over MQTT, CoAP and HTTP(/2) with the ThingsBoard device API; their data
moves through a bus and a pipeline into time-series storage. The same code runs as one
process (`iotmesh run`) or as microservices (`iotmesh serve SERVICE`).
"""

from typing import TYPE_CHECKING, Any

from iotmesh.core.errors import IotmeshError

if TYPE_CHECKING:
    from iotmesh.core.settings import Settings

__version__ = "0.1.0"
__all__ = ["IotmeshError", "Settings", "__version__"]


def __getattr__(name: str) -> Any:
    # Settings is imported on first use: the SQLite writer process imports this package
    # too, and pydantic-settings would cost it 14 MB of memory it never needs.
    if name == "Settings":
        from iotmesh.core.settings import Settings

        return Settings
    raise AttributeError(f"module 'iotmesh' has no attribute {name!r}")
