"""The device registry: devices, their credentials, and authentication of device tokens."""

from iotmesh.registry.service import DeviceRegistry, DeviceUpdate

__all__ = ["DeviceRegistry", "DeviceUpdate"]
