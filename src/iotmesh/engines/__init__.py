"""Client-side helpers for the distributed engines (Redis, NATS JetStream KV).

What more than one layer does with the same engine lives here once: leases with a TTL
(the bus's partition leases, the cluster's leader leases) and KV buckets. It sits below
`bus` and `cluster` and imports only `core` and the engine clients.
"""
