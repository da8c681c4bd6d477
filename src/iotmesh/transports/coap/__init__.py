"""The CoAP transport: the ThingsBoard device API over CoAP/UDP, served with aiocoap."""

from iotmesh.transports.coap.server import CoapServer

__all__ = ["CoapServer"]
