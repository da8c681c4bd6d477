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
        self._kv: dict[str, KeyValue] = {}

    async def start(self) -> None:
        try:
            self._nc = await nats.connect(self._url, connect_timeout=5, allow_reconnect=True)
            js = self._nc.jetstream(timeout=5)
            self._kv = {
                "services": await open_bucket(
                    js, f"{self._ns}_cluster_services", self.settings.ttl_s
                ),
                "leases": await open_bucket(
                    js, f"{self._ns}_cluster_leases", self.settings.lease_s
                ),
                "fences": await open_bucket(js, f"{self._ns}_cluster_fences", None),
            }
            ttl = (await self._kv["leases"].status()).ttl
        except (OSError, nats.errors.Error) as exc:
            await self.stop()
            raise ClusterError(f"cannot use NATS at {self._url}: {exc}") from exc
        if ttl is None or abs(ttl - self.settings.lease_s) > 1e-3:
            await self.stop()
            raise ClusterError(
                f"NATS bucket {self._ns}_cluster_leases expires leases after {ttl} s but"
                f" cluster.lease_s is {self.settings.lease_s}: use the same lease_s"
                " everywhere, or delete the bucket while no instance runs"
            )
        self._leases = KvLeases(self._kv["leases"])

    async def stop(self) -> None:
        nc, self._nc = self._nc, None
        self._kv = {}
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.close()

    def _bucket(self, name: str) -> KeyValue:
        kv = self._kv.get(name)
        if kv is None:
            raise ClusterError("the cluster backend is stopped")
        return kv

    async def _call(self, what: str, aw: Any) -> Any:
        try:
            return await aw
        except (nats.js.errors.NotFoundError, nats.js.errors.KeyWrongLastSequenceError):
            raise  # answers, not failures: the callers handle them
        except (OSError, nats.errors.Error) as exc:
            raise ClusterError(f"NATS: {what} failed: {exc}") from exc

    # -- registry -----------------------------------------------------------------

    async def put(self, instance: Instance) -> None:
        kv = self._bucket("services")
        await self._call("registering", kv.put(instance.key, model.encode(instance)))

    async def remove(self, service: str, instance_id: str) -> None:
        kv = self._bucket("services")
        await self._call("deregistering", kv.purge(f"{service}.{instance_id}"))

    async def list(self, service: str | None = None) -> builtins.list[Instance]:
        kv = self._bucket("services")
        found = []
        for data in await self._call(
            "listing", self._values(kv, f"{service}.*" if service else ">")
        ):
            try:
                found.append(model.decode(data))
            except msgspec.DecodeError:
                continue
        return sorted(found, key=lambda i: i.key)

    @staticmethod
    async def _values(kv: KeyValue, keys: str) -> builtins.list[bytes]:
        """The current values of `keys` (a KV pattern), read with one watcher."""
        watcher = await kv.watch(keys, ignore_deletes=True)
        values: builtins.list[bytes] = []
        try:
            async for entry in watcher:
                if entry is None:  # the initial values are all delivered
                    break
                if entry.value:
                    values.append(entry.value)
        finally:
            await watcher.stop()  # type: ignore[no-untyped-call]
        return values

    # -- leases -------------------------------------------------------------------

    async def acquire(self, name: str, owner: str, ttl_s: float) -> int | None:
        revision = await self._call("acquire", self._leases.acquire(name, f"{owner}#0".encode()))
        if revision is None:
            return None
        try:
            await self._call(
                "acquire",
                self._leases.kv.update(name, f"{owner}#{revision}".encode(), last=revision),
            )
        except nats.js.errors.KeyWrongLastSequenceError:
            return None  # expired and taken in between: not ours
        return int(revision)

    async def renew(self, name: str, owner: str, token: int, ttl_s: float) -> bool:
        got = await self._call("renew", self._leases.renew(name, f"{owner}#{token}".encode()))
        return got is not None

    async def release(self, name: str, owner: str, token: int) -> None:
        await self._call("release", self._leases.release(name, f"{owner}#{token}".encode()))

    async def holder(self, name: str) -> tuple[str, int] | None:
        try:
            entry = await self._call("holder", self._leases.kv.get(name))
        except nats.js.errors.NotFoundError:
            return None
        owner, _, token = bytes(entry.value or b"").decode().rpartition("#")
        return (owner, int(token)) if owner and token != "0" else None

    # -- fences -------------------------------------------------------------------

    async def write(self, resource: str, token: int, value: bytes) -> None:
        kv = self._bucket("fences")
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
            entry = await self._call("fence read", self._bucket("fences").get(resource))
        except nats.js.errors.NotFoundError:
            return None
        data = bytes(entry.value or b"")
        return int.from_bytes(data[:8], "big"), data[8:]

    async def delete_everything(self) -> None:
        if self._nc is None:
            raise ClusterError("the cluster backend is stopped")
        js: JetStreamContext = self._nc.jetstream()
        for bucket in ("services", "leases", "fences"):
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.delete_key_value(f"{self._ns}_cluster_{bucket}")
