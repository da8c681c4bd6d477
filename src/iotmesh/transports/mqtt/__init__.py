"""The MQTT server: MQTT 3.1.1 and 5.0 on asyncio Protocols, with the ThingsBoard device
and gateway API and a broker between authorised clients."""

from iotmesh.transports.mqtt.server import MqttServer

__all__ = ["MqttServer"]
