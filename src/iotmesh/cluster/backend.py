"""One connection to the cluster engine serving the registry, leases and fences."""

from __future__ import annotations

import abc

from iotmesh.cluster.election import LeaseStore
from iotmesh.cluster.fencing import Fence
from iotmesh.cluster.registry import Registry
from iotmesh.core.lifecycle import Service
from iotmesh.core.settings import Settings


class ClusterBackend(Registry, LeaseStore, Fence, Service):
    """Registry, leases and fences on one engine; `start` connects, `stop` closes."""

    @abc.abstractmethod
    async def delete_everything(self) -> None:
        """Delete every key or bucket of this namespace (tests and operators)."""


def cluster_engine(settings: Settings) -> str:
    """`cluster.backend` if the settings name it; unset, the bus's engine when the bus is
    NATS or Redis (so `iotmesh serve` on one engine needs no other, and `iotmesh
    services` with the same settings reads where it registered); else Redis."""
    c = settings.cluster
    if "backend" not in c.model_fields_set and settings.bus.backend in ("nats", "redis"):
        return settings.bus.backend
    return c.backend


def make_backend(settings: Settings) -> ClusterBackend:
    """The backend `cluster_engine` names, not started; Redis and NATS urls default to the
    bus's."""
    c = settings.cluster
    engine = cluster_engine(settings)
    if engine == "kubernetes":
        from iotmesh.cluster.k8s_backend import KubernetesCluster

        return KubernetesCluster(c)
    if engine == "nats":
        from iotmesh.cluster.nats_backend import NatsCluster

        return NatsCluster(c, c.nats_url or settings.bus.nats_url)
    from iotmesh.cluster.redis_backend import RedisCluster

    return RedisCluster(c, c.redis_url or settings.bus.redis_url)
