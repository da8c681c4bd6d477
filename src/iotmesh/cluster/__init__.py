"""Several iotmesh instances working together: registry, discovery, leader election.

- `registry.Registration` keeps an instance's `Instance` record in the engine with a
  TTL heartbeat; `Registry.list` / `watch` read them (`iotmesh services` prints them).
- `discovery.Discovery` watches one service's heartbeats with a phi-accrual failure
  detector (`phi.py`), balances calls over the live instances (`balance.py`: round
  robin, least outstanding, consistent hash by device id), with timeouts, retries on
  another instance and a circuit breaker per instance (`breaker.py`); `http.ServiceHttp`
  does it for HTTP calls.
- `election.LeaderElection` runs a singleton job on one instance at a time, on the
  engine's leases, with fencing tokens; `fencing` refuses a deposed leader's writes.

The engine is Redis, NATS JetStream KV or the Kubernetes API's Lease objects
(`cluster.backend`); `make_backend` builds one `ClusterBackend` that is registry,
lease store and fence at once.
"""

from iotmesh.cluster.backend import ClusterBackend, make_backend
from iotmesh.cluster.discovery import Discovery
from iotmesh.cluster.election import LeaderElection, LeaseStore
from iotmesh.cluster.errors import CallFailed, ClusterError, NoInstance, StaleToken
from iotmesh.cluster.fencing import Fence, fenced_sqlite
from iotmesh.cluster.model import Instance
from iotmesh.cluster.phi import PhiAccrualDetector
from iotmesh.cluster.registry import Registration, Registry

__all__ = [
    "CallFailed",
    "ClusterBackend",
    "ClusterError",
    "Discovery",
    "Fence",
    "Instance",
    "LeaderElection",
    "LeaseStore",
    "NoInstance",
    "PhiAccrualDetector",
    "Registration",
    "Registry",
    "StaleToken",
    "fenced_sqlite",
    "make_backend",
]
