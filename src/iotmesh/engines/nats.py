"""NATS JetStream KV: buckets with a TTL, and leases in them.

A lease is a KV entry whose value is the holder: `create` (fails if the key exists),
`update` with the revision last read (fails if anyone wrote since), `delete` with it.
The bucket's TTL (`max_age`) expires an entry not written for that long, so a dead
holder's lease lapses by itself. Revisions grow across the whole bucket, so the
revision at which a lease was created is larger than any revision written before: a
fencing token. Used by the bus (partition leases) and the cluster (leader leases).
"""

from __future__ import annotations

import contextlib

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

_EXISTS = 10058  # JetStream: stream name already in use (with another configuration)


async def open_bucket(js: JetStreamContext, bucket: str, ttl_s: float | None) -> KeyValue:
    """The KV bucket `bucket` (history 1), created with TTL `ttl_s` if missing.

    A bucket made earlier with another TTL is used as it is (a KV bucket's TTL cannot
    change); keep the setting equal across processes sharing a namespace.

    Raises:
        nats.js.errors.BadRequestError: the server refused it for another reason.
    """
    try:
        return await js.create_key_value(bucket=bucket, ttl=ttl_s, history=1)
    except nats.js.errors.BadRequestError as exc:
        if exc.err_code != _EXISTS:
            raise
        return await js.key_value(bucket)


class KvLeases:
    """Leases as entries of a KV bucket with a TTL."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def acquire(self, key: str, value: bytes) -> int | None:
        """Take the lease if nobody holds it; its revision (a fencing token), else None."""
        try:
            return await self.kv.create(key, value)
        except nats.js.errors.KeyWrongLastSequenceError:
            return None

    async def renew(self, key: str, value: bytes) -> int | None:
        """Rewrite a lease held as `value` (restarting its TTL); its new revision, or None."""
        try:
            entry = await self.kv.get(key)
        except nats.js.errors.NotFoundError:  # expired, deleted or purged
            return None
        if entry.value != value or entry.revision is None:
            return None
        try:
            return await self.kv.update(key, value, last=entry.revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            return None

    async def release(self, key: str, value: bytes) -> None:
        """Delete the lease if it is still held as `value`."""
        with contextlib.suppress(
            nats.js.errors.NotFoundError, nats.js.errors.KeyWrongLastSequenceError
        ):
            entry = await self.kv.get(key)
            if entry.value == value:
                await self.kv.delete(key, last=entry.revision)
