"""The cluster on NATS JetStream KV: registry, leader leases, fences.

Buckets, `ns` being `cluster.namespace` (all with history 1):

- `<ns>_cluster_services`, TTL `ttl_s`: key `<service>.<instance>`, an instance record
  (JSON). The bucket's TTL deletes a record not rewritten in time.
- `<ns>_cluster_leases`, TTL `lease_s`: key `<name>`, value `<owner>#<token>`. The
  lease is taken with `create` (fails while it exists); the token is the revision of
  that create, written into the value right after (update at that revision), so
  renewals (update at the last revision read) and `holder` know it.
- `<ns>_cluster_fences`, no TTL: key `<resource>`, value = 8-byte big-endian token +
  the data; a fenced write is a compare-and-set on the entry's revision.

A bucket's TTL is fixed when it is made: processes sharing a namespace must agree on
`ttl_s` and `lease_s` (the first one's values stay). `start` refuses a lease bucket
whose TTL is not `lease_s`: a leader believes its lease for `lease_s` minus a margin,
so an entry that expired sooner could let two lead at once.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
from typing import Any

import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from iotmesh.cluster import model
from iotmesh.cluster.backend import ClusterBackend
from iotmesh.cluster.errors import ClusterError, StaleToken
from iotmesh.cluster.model import Instance
from iotmesh.core.settings import ClusterSettings
from iotmesh.engines.nats import KvLeases, open_bucket


class NatsCluster(ClusterBackend):
    """See the module docstring."""

    name = "cluster.nats"

    def __init__(self, settings: ClusterSettings, url: str) -> None:
        self.settings = settings
        self._url = url
        self._ns = settings.namespace
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._kv: dict[str, KeyValue] = {}

    async def start(self) -> None:
        try:
            self._nc = await nats.connect(self._url, connect_timeout=5, allow_reconnect=True)
            self._js = self._nc.jetstream(timeout=5)
            await self._open("services")
        except (OSError, nats.errors.Error) as exc:
            await self.stop()
            raise ClusterError(f"cannot use NATS at {self._url}: {exc}") from exc

    async def stop(self) -> None:
        nc, self._nc, self._js = self._nc, None, None
        self._kv = {}
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.close()

    async def _open(self, name: str) -> KeyValue:
        """Bucket `name`, opened (and made) on first use: a reader of the registry
        (`iotmesh services`) touches neither the lease nor the fence bucket."""
        cached = self._kv.get(name)
        if cached is not None:
            return cached
        if self._js is None:
            raise ClusterError("the cluster backend is stopped")
        ttl = {"services": self.settings.ttl_s, "leases": self.settings.lease_s}.get(name)
        kv: KeyValue = await self._call(
            "opening a bucket", open_bucket(self._js, self._bucket_name(name), ttl)
        )
        if name == "leases":
            actual = (await self._call("bucket status", kv.status())).ttl
            if actual is None or abs(actual - self.settings.lease_s) > 1e-3:
                raise ClusterError(
                    f"NATS bucket {self._bucket_name(name)} expires leases after {actual} s"
                    f" but cluster.lease_s is {self.settings.lease_s}: use the same lease_s"
                    " everywhere, or delete the bucket while no instance runs"
                )
        self._kv[name] = kv
        return kv

    def _bucket_name(self, name: str) -> str:
        return f"{self._ns}_cluster_{name}"

    async def _leases(self) -> KvLeases:
        return KvLeases(await self._open("leases"))

    async def _call(self, what: str, aw: Any) -> Any:
        try:
            return await aw
        except (nats.js.errors.NotFoundError, nats.js.errors.KeyWrongLastSequenceError):
            raise  # answers, not failures: the callers handle them
        except (OSError, nats.errors.Error) as exc:
            raise ClusterError(f"NATS: {what} failed: {exc}") from exc

    # -- registry -----------------------------------------------------------------

    async def put(self, instance: Instance) -> None:
        kv = await self._open("services")
        await self._call("registering", kv.put(instance.key, model.encode(instance)))

    async def remove(self, service: str, instance_id: str) -> None:
        kv = await self._open("services")
        await self._call("deregistering", kv.purge(f"{service}.{instance_id}"))

    async def list(self, service: str | None = None) -> builtins.list[Instance]:
        found = []
        for data in await self._call(
            "listing", self._values("services", f"{service}.*" if service else ">")
        ):
            try:
                found.append(model.decode(data))
            except msgspec.DecodeError:
                continue
        return sorted(found, key=lambda i: i.key)

    async def _values(self, name: str, keys: str) -> builtins.list[bytes]:
        """The current value of each key matching `keys` (a KV pattern), once each.

        Not with a KV watcher: its "initial values done" marker comes after updates
        that arrive meanwhile, so under heartbeats it listed a key twice (measured: half
        the listings of two instances beating every few ms) and, once in CI, missed
        one. Instead: the keys that have messages (stream info of the bucket's stream,
        filtered), then each key's last value; deleted and purged keys are skipped.
        """
        kv = await self._open(name)  # raises when stopped: then there is no `_js`
        js = self._js
        assert js is not None
        bucket = self._bucket_name(name)
        prefix = f"$KV.{bucket}."
        info = await js.stream_info(f"KV_{bucket}", subjects_filter=prefix + keys)
        subjects = info.state.subjects or {}
        entries = await asyncio.gather(
            *(self._current(kv, subject.removeprefix(prefix)) for subject in subjects)
        )
        return [entry for entry in entries if entry]

    @staticmethod
    async def _current(kv: KeyValue, key: str) -> bytes | None:
        try:
            entry = await kv.get(key)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return None  # deleted, purged or expired since the stream info
        return entry.value or None

    # -- leases -------------------------------------------------------------------

    async def acquire(self, name: str, owner: str, ttl_s: float) -> int | None:
        leases = await self._leases()
        revision = await self._call("acquire", leases.acquire(name, f"{owner}#0".encode()))
        if revision is None:
            return None
        value = f"{owner}#{revision}".encode()
        try:
            await self._call("acquire", leases.kv.update(name, value, last=revision))
        except nats.js.errors.KeyWrongLastSequenceError:
            return None  # expired and taken in between: not ours
        return int(revision)

    async def renew(self, name: str, owner: str, token: int, ttl_s: float) -> bool:
        leases = await self._leases()
        got = await self._call("renew", leases.renew(name, f"{owner}#{token}".encode()))
        return got is not None

    async def release(self, name: str, owner: str, token: int) -> None:
        leases = await self._leases()
        await self._call("release", leases.release(name, f"{owner}#{token}".encode()))

    async def holder(self, name: str) -> tuple[str, int] | None:
        leases = await self._leases()
        try:
            entry = await self._call("holder", leases.kv.get(name))
        except nats.js.errors.NotFoundError:
            return None
        owner, _, token = bytes(entry.value or b"").decode().rpartition("#")
        return (owner, int(token)) if owner and token != "0" else None

    # -- fences -------------------------------------------------------------------

    async def write(self, resource: str, token: int, value: bytes) -> None:
        kv = await self._open("fences")
        data = token.to_bytes(8, "big") + value
        while True:
            try:
                entry = await self._call("fence read", kv.get(resource))
            except nats.js.errors.NotFoundError:
                try:
                    await self._call("fenced write", kv.create(resource, data))
                    return
                except nats.js.errors.KeyWrongLastSequenceError:
                    continue  # another writer came first: compare with its token
            seen = int.from_bytes(bytes(entry.value or b"")[:8], "big")
            if token < seen:
                raise StaleToken(resource, token, seen)
            try:
                await self._call("fenced write", kv.update(resource, data, last=entry.revision))
                return
            except nats.js.errors.KeyWrongLastSequenceError:
                continue

    async def read(self, resource: str) -> tuple[int, bytes] | None:
        try:
            entry = await self._call("fence read", (await self._open("fences")).get(resource))
        except nats.js.errors.NotFoundError:
            return None
        data = bytes(entry.value or b"")
        return int.from_bytes(data[:8], "big"), data[8:]

    async def delete_everything(self) -> None:
        if self._nc is None:
            raise ClusterError("the cluster backend is stopped")
        js: JetStreamContext = self._nc.jetstream()
        self._kv = {}
        for bucket in ("services", "leases", "fences"):
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.delete_key_value(f"{self._ns}_cluster_{bucket}")
