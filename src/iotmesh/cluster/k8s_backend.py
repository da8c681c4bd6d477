"""The cluster on the Kubernetes API: registry, leader leases, fences, all as Leases.

Every object is a coordination.k8s.io/v1 Lease in one Kubernetes namespace, labelled
`iotmesh.io/namespace=<cluster.namespace>` and `iotmesh.io/role` (instance, lease or
fence), named `<ns>.<role>.<name>` (`object_name`). Kubernetes never expires a Lease:
like kubelet's node leases and client-go's leader election, a Lease is live while
`renewTime + leaseDurationSeconds` is in the future, judged by the reader's clock.
So the clocks of the pods must agree (NTP) to well within `lease_s / 3`, the margin a
leader keeps (`election.py`); fencing tokens catch what a larger skew lets through.
`leaseDurationSeconds` is whole seconds: a fractional `ttl_s` or `lease_s` is
rounded up, so a lease lasts longer for the others than its holder believes it.

- registry: one Lease per instance (as kubelet keeps one per node), holderIdentity
  `<service>.<instance>`, the `Instance` record (JSON) in annotation
  `iotmesh.io/instance`, leaseDurationSeconds = `ttl_s`, renewTime = the heartbeat.
  A heartbeat replaces the Lease at the resourceVersion of the last write; listing
  is one LIST by label selector and leaves out expired Leases, and deletes those
  silent for a further `ttl_s` (nothing else would: Kubernetes keeps them forever).
- leases: acquire = create, or replace a free (released or expired) one at the
  resourceVersion read, with the fencing token + 1 in annotation
  `iotmesh.io/fencing-token` and leaseTransitions + 1; a 409 means another
  candidate won. Renew and release replace at the resourceVersion read; release
  clears holderIdentity but keeps the Lease, so the token keeps growing.
- fences: a Lease per resource with the highest token and the value (base64) in
  annotations; a fenced write is a compare-and-set on its resourceVersion.

The Lease objects must not be deleted while instances run: a lease made again starts
its tokens at 1, and its fences would refuse the new leader (as with a Redis that lost
its data). Tested against a fake API server only (tests/k8s_fake.py): no Kubernetes
cluster can run where this was written.
"""

from __future__ import annotations

import base64
import builtins
import contextlib
import hashlib
import logging
import math
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from iotmesh.cluster import model
from iotmesh.cluster.backend import ClusterBackend
from iotmesh.cluster.errors import ClusterError, StaleToken
from iotmesh.cluster.k8s_api import ApiConfig, Conflict, LeaseApi, NotFound
from iotmesh.cluster.model import Instance
from iotmesh.core.settings import ClusterSettings

log = logging.getLogger(__name__)

NAMESPACE_LABEL = "iotmesh.io/namespace"
ROLE_LABEL = "iotmesh.io/role"
SERVICE_LABEL = "iotmesh.io/service"
INSTANCE_ANNOTATION = "iotmesh.io/instance"
TOKEN_ANNOTATION = "iotmesh.io/fencing-token"
VALUE_ANNOTATION = "iotmesh.io/value"
ATTEMPTS = 50  # compare-and-set rounds before giving up: each lost one is another's win

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_LABEL_VALUE = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")


def object_name(*parts: str) -> str:
    """`parts` joined by '.' into a DNS subdomain, the form of Kubernetes names.

    Parts are `check_name` names (letters, digits, '-', '_', no dots). Parts that are
    DNS labels already are used as they are; otherwise each is lowercased, '_' made
    '-', trimmed, and a hash of the originals is appended as one more part, so a
    changed name has one part more than an unchanged one and two names never meet.
    """
    plain = ".".join(parts)
    if len(plain) <= 253 and all(len(p) <= 63 and _DNS_LABEL.fullmatch(p) for p in parts):
        return plain
    safe = [p.lower().replace("_", "-")[:40].strip("-") or "x" for p in parts]
    return ".".join([*safe, hashlib.sha256("\0".join(parts).encode()).hexdigest()[:12]])


def label_value(value: str) -> str:
    """`value` if Kubernetes takes it as a label value, else a hash of it."""
    if len(value) <= 63 and _LABEL_VALUE.fullmatch(value):
        return value
    return "h" + hashlib.sha256(value.encode()).hexdigest()[:40]


def _now() -> datetime:
    return datetime.now(UTC)


def _micro_time(t: datetime) -> str:
    """Kubernetes MicroTime (RFC 3339 with microseconds, UTC)."""
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _seconds(ttl_s: float) -> int:
    return max(1, math.ceil(ttl_s))


def _expires(lease: dict[str, Any]) -> datetime | None:
    """When the Lease stops being held; None when nobody holds it."""
    spec = lease.get("spec") or {}
    renewed = spec.get("renewTime")
    if not spec.get("holderIdentity") or not renewed:
        return None
    at = datetime.fromisoformat(renewed.replace("Z", "+00:00"))
    return at + timedelta(seconds=int(spec.get("leaseDurationSeconds") or 0))


def _held(lease: dict[str, Any], now: datetime) -> bool:
    expires = _expires(lease)
    return expires is not None and expires > now


def _token(lease: dict[str, Any]) -> int:
    annotations = lease["metadata"].get("annotations") or {}
    return int(annotations.get(TOKEN_ANNOTATION, "0"))


class KubernetesCluster(ClusterBackend):
    """See the module docstring."""

    name = "cluster.kubernetes"

    def __init__(self, settings: ClusterSettings) -> None:
        self.settings = settings
        self._ns = settings.namespace
        self._api: LeaseApi | None = None
        self._written: dict[str, str] = {}  # instance Lease -> resourceVersion we wrote

    @property
    def api(self) -> LeaseApi:
        if self._api is None:
            raise ClusterError("the cluster backend is stopped")
        return self._api

    async def start(self) -> None:
        """Connect, and list once, so that a wrong URL, token or RBAC fails start-up."""
        api = LeaseApi(ApiConfig.from_settings(self.settings))
        await api.open()
        try:
            await api.list(self._labels("instance"), limit=1)
        except ClusterError:
            await api.close()
            raise
        self._api = api

    async def stop(self) -> None:
        api, self._api = self._api, None
        self._written = {}
        if api is not None:
            await api.close()

    def _labels(self, role: str, **more: str) -> dict[str, str]:
        return {NAMESPACE_LABEL: label_value(self._ns), ROLE_LABEL: role, **more}

    def _lease(
        self, name: str, labels: dict[str, str], annotations: dict[str, str], **spec: Any
    ) -> dict[str, Any]:
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": name, "labels": labels, "annotations": annotations},
            "spec": spec,
        }

    # -- registry -----------------------------------------------------------------

    def _instance_name(self, service: str, instance_id: str) -> str:
        return object_name(self._ns, "instance", service, instance_id)

    async def put(self, instance: Instance) -> None:
        name = self._instance_name(instance.service, instance.instance_id)
        lease = self._lease(
            name,
            self._labels("instance", **{SERVICE_LABEL: label_value(instance.service)}),
            {INSTANCE_ANNOTATION: model.encode(instance).decode()},
            holderIdentity=instance.key,
            leaseDurationSeconds=_seconds(self.settings.ttl_s),
            renewTime=_micro_time(_now()),
        )
        for _ in range(ATTEMPTS):
            version = self._written.pop(name, None)
            try:
                if version is None:
                    current = await self.api.get(name)
                    if current is None:
                        made = await self.api.create(lease)
                        self._written[name] = made["metadata"]["resourceVersion"]
                        return
                    version = current["metadata"]["resourceVersion"]
                lease["metadata"]["resourceVersion"] = version
                written = await self.api.replace(lease)
                self._written[name] = written["metadata"]["resourceVersion"]
                return
            except (Conflict, NotFound):
                continue  # changed or deleted since we wrote it: read it again
        raise ClusterError(f"Kubernetes API: registering {instance.key}: the Lease kept changing")

    async def remove(self, service: str, instance_id: str) -> None:
        name = self._instance_name(service, instance_id)
        self._written.pop(name, None)
        with contextlib.suppress(NotFound):
            await self.api.delete(name)

    async def list(self, service: str | None = None) -> builtins.list[Instance]:
        more = {SERVICE_LABEL: label_value(service)} if service else {}
        leases = await self.api.list(self._labels("instance", **more))
        now = _now()
        found = []
        for lease in leases:
            expires = _expires(lease)
            if expires is None or expires <= now:
                await self._collect(lease, expires, now)
                continue
            annotations = lease["metadata"].get("annotations") or {}
            try:
                instance = model.decode(annotations.get(INSTANCE_ANNOTATION, "").encode())
            except msgspec.DecodeError:
                continue  # not ours, or from an incompatible version: not listed
            if service is None or instance.service == service:
                found.append(instance)
        return sorted(found, key=lambda i: i.key)

    async def _collect(
        self, lease: dict[str, Any], expires: datetime | None, now: datetime
    ) -> None:
        """Delete an instance's Lease silent for a further `ttl_s` past its expiry (at
        its resourceVersion: a heartbeat in between keeps it). Best effort."""
        if expires is not None and now - expires < timedelta(seconds=self.settings.ttl_s):
            return
        meta = lease["metadata"]
        try:
            await self.api.delete(meta["name"], meta["resourceVersion"])
        except ClusterError as exc:
            log.debug("cluster.kubernetes: leaving expired %s: %s", meta["name"], exc)

    # -- leases -------------------------------------------------------------------

    def _lease_name(self, name: str) -> str:
        return object_name(self._ns, "lease", name)

    async def acquire(self, name: str, owner: str, ttl_s: float) -> int | None:
        obj = self._lease_name(name)
        now = _micro_time(_now())  # before the request: the term counts from here
        current = await self.api.get(obj)
        try:
            if current is None:
                lease = self._lease(
                    obj,
                    self._labels("lease"),
                    {TOKEN_ANNOTATION: "1"},
                    holderIdentity=owner,
                    leaseDurationSeconds=_seconds(ttl_s),
                    acquireTime=now,
                    renewTime=now,
                    leaseTransitions=0,
                )
                await self.api.create(lease)
                return 1
            if _held(current, _now()):
                return None
            token = _token(current) + 1
            current["metadata"].setdefault("annotations", {})[TOKEN_ANNOTATION] = str(token)
            spec = current.setdefault("spec", {})
            spec.update(
                holderIdentity=owner,
                leaseDurationSeconds=_seconds(ttl_s),
                acquireTime=now,
                renewTime=now,
                leaseTransitions=int(spec.get("leaseTransitions") or 0) + 1,
            )
            await self.api.replace(current)
            return token
        except (Conflict, NotFound):
            return None  # another candidate came first

    async def _held_by(self, name: str, owner: str, token: int) -> dict[str, Any] | None:
        """The Lease if `(owner, token)` holds it now."""
        lease = await self.api.get(self._lease_name(name))
        if lease is None or not _held(lease, _now()):
            return None
        if lease["spec"].get("holderIdentity") != owner or _token(lease) != token:
            return None
        return lease

    async def renew(self, name: str, owner: str, token: int, ttl_s: float) -> bool:
        now = _micro_time(_now())
        lease = await self._held_by(name, owner, token)
        if lease is None:
            return False
        lease["spec"].update(renewTime=now, leaseDurationSeconds=_seconds(ttl_s))
        try:
            await self.api.replace(lease)
        except (Conflict, NotFound):
            return False
        return True

    async def release(self, name: str, owner: str, token: int) -> None:
        lease = await self._held_by(name, owner, token)
        if lease is None:
            return
        del lease["spec"]["holderIdentity"]
        with contextlib.suppress(Conflict, NotFound):
            await self.api.replace(lease)

    async def holder(self, name: str) -> tuple[str, int] | None:
        lease = await self.api.get(self._lease_name(name))
        if lease is None or not _held(lease, _now()):
            return None
        return str(lease["spec"]["holderIdentity"]), _token(lease)

    # -- fences -------------------------------------------------------------------

    async def write(self, resource: str, token: int, value: bytes) -> None:
        obj = object_name(self._ns, "fence", resource)
        annotations = {
            TOKEN_ANNOTATION: str(token),
            VALUE_ANNOTATION: base64.b64encode(value).decode(),
        }
        for _ in range(ATTEMPTS):
            current = await self.api.get(obj)
            try:
                if current is None:
                    await self.api.create(self._lease(obj, self._labels("fence"), annotations))
                    return
                seen = _token(current)
                if token < seen:
                    raise StaleToken(resource, token, seen)
                current["metadata"]["annotations"] = annotations
                await self.api.replace(current)
                return
            except (Conflict, NotFound):
                continue  # another writer came first: compare with its token
        raise ClusterError(f"Kubernetes API: fenced write to {resource!r}: the Lease kept changing")

    async def read(self, resource: str) -> tuple[int, bytes] | None:
        lease = await self.api.get(object_name(self._ns, "fence", resource))
        if lease is None:
            return None
        value = (lease["metadata"].get("annotations") or {}).get(VALUE_ANNOTATION, "")
        return _token(lease), base64.b64decode(value)

    async def delete_everything(self) -> None:
        for lease in await self.api.list({NAMESPACE_LABEL: label_value(self._ns)}):
            with contextlib.suppress(NotFound):
                await self.api.delete(lease["metadata"]["name"])
        self._written = {}
