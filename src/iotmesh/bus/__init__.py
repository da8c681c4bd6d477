"""The message bus between transports and the pipeline.

`interface` holds the Publisher/Subscriber seam; `memory` the in-process implementation
used by `iotmesh run`; `nats` (JetStream) and `redis_streams` (Redis Streams) the
durable ones for services in several processes. `make_bus` picks one from settings.
"""

from iotmesh.bus.interface import Bus, Delivery, Publisher, Subscriber, Subscription
from iotmesh.core.settings import BusSettings


def make_bus(settings: BusSettings) -> Bus:
    """The bus `settings.backend` names, not started yet.

    The engine clients are imported only here, so the all-in-one process, which keeps
    the in-process bus, does not load them.
    """
    if settings.backend == "nats":
        from iotmesh.bus.nats import NatsBus

        return NatsBus(settings)
    if settings.backend == "redis":
        from iotmesh.bus.redis_streams import RedisBus

        return RedisBus(settings)
    from iotmesh.bus.memory import MemoryBus

    return MemoryBus(settings)


__all__ = ["Bus", "Delivery", "Publisher", "Subscriber", "Subscription", "make_bus"]
