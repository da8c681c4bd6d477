"""The MQTT codec in one import: `encode` (packet -> bytes) and `MqttReader` (bytes ->
packets). Both are pure and sans-IO: the transport owns the socket, the session owns the
state machine; this layer only knows the wire format.

Split in two modules because they change for different reasons: `encoder` follows what
we choose to send, `reader`/`decoder` follow everything a peer may send us.
"""

from __future__ import annotations

from .encoder import encode
from .reader import MAX_PACKET_SIZE, MqttReader

__all__ = ["MAX_PACKET_SIZE", "MqttReader", "encode"]
