"""Redis for hot state: caches and messages several processes share (docs/storage.md).

Nothing here is the only copy of anything; the stores hold what is durable, and every
part degrades to the store (or to this process alone) when Redis is down.
"""

from iotmesh.storage.redis.attributes import RedisAttributeCache
from iotmesh.storage.redis.client import HotState, HotStateError
from iotmesh.storage.redis.connectivity import RedisConnectivityMirror
from iotmesh.storage.redis.latest import RedisLatestValues
from iotmesh.storage.redis.ratelimit import RedisRateLimiter
from iotmesh.storage.redis.wakeups import RedisRpcNotifier

__all__ = [
    "HotState",
    "HotStateError",
    "RedisAttributeCache",
    "RedisConnectivityMirror",
    "RedisLatestValues",
    "RedisRateLimiter",
    "RedisRpcNotifier",
]
