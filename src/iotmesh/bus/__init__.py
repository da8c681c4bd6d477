"""The message bus between transports and the pipeline.

`interface` holds the Publisher/Subscriber seam; `memory` the in-process implementation
used by `iotmesh run`. NATS JetStream and Redis Streams implementations plug in behind
the same interface.
"""

from iotmesh.bus.interface import Bus, Delivery, Publisher, Subscriber, Subscription

__all__ = ["Bus", "Delivery", "Publisher", "Subscriber", "Subscription"]
