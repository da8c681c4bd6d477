"""Attributes: CLIENT (reported by the device), SHARED (set by users, pushed to the
device), SERVER (set by users, never shown to the device).

Pushing SHARED changes: a transport that holds a live session for a device (an MQTT
client subscribed to `v1/devices/me/attributes`, later a CoAP observer or an HTTP
long-poll) registers a listener for that device; every committed change of shared
attributes is handed to each listener of the device. Listeners are called after the
store committed, so a device is never told about a value that could still be lost.

Several processes (`iotmesh serve`): the session of a device may live in another
process than the one that committed the change (a REST call on `http`, the device on
`mqtt`). With a `Broadcast` (the bus engine's live fan-out), each committed SHARED change
is also published on the topic `attributes` (a `SharedChange`); every other process
hands it to its own listeners of that device, and the originating one skips its own
message, having called its listeners already. The push is live and at most once (a
process that is not subscribed then misses it); the store stays the source of truth,
which a device reads when it (re)connects or asks. Without a broadcast (`iotmesh
run`) nothing is published: one process holds every session.

The twin (`twin`) is the same data seen as desired and reported state: desired = SHARED
(what users want the device to take), reported = CLIENT (what the device says it has).
Each key carries its own version, which grows by one per change; a deleted key that is
set again starts over at 1.

With an `AttributeCache` (Redis, `storage.redis.attribute_cache`), reads are served
from the whole scope of a device cached there, filled from the store on a miss and
invalidated after every save or delete is committed; a fill that raced with an
invalidation is refused (the cache's `token`), so no process caches what was replaced.
Error handling: a cache that fails is bypassed (reads go to the store); a device whose
invalidation failed is read from the store here until one gets through (other
processes may see the old value for up to `attribute_cache_ttl_s`).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import msgspec

from iotmesh.bus.broadcast import Broadcast
from iotmesh.bus.interface import Subscription
from iotmesh.bus.subjects import SHARED_ATTRIBUTES as TOPIC
from iotmesh.core.clock import now_ms
from iotmesh.core.errors import IotmeshError, PayloadError
from iotmesh.core.lifecycle import Service
from iotmesh.core.types import Attribute, AttributeScope
from iotmesh.proto.thingsboard import MAX_KEY_LENGTH
from iotmesh.storage.state import StateStore

log = logging.getLogger(__name__)

SharedListener = Callable[[dict[str, Any], list[str]], Awaitable[None]]
"""Called with (changed shared values, deleted shared keys) of one device."""

MAX_ATTRIBUTES_PER_WRITE = 1000
MAX_UNINVALIDATED = 10_000


class SharedChange(msgspec.Struct, frozen=True):
    """A committed change of a device's SHARED attributes, as broadcast to the other
    processes (JSON); `origin` names the process that committed it."""

    origin: str
    device_id: str
    changed: dict[str, Any]
    deleted: list[str]


class AttributeCache(Protocol):
    """All attributes of one scope of a device, cached for several processes.

    Error handling: every method raises an `IotmeshError` when the cache is down."""

    async def read(
        self, device_id: str, scope: AttributeScope
    ) -> tuple[list[Attribute] | None, bytes]:
        """The cached attributes (None: a miss) and a token for `fill`."""
        ...

    async def fill(
        self, device_id: str, scope: AttributeScope, attributes: list[Attribute], token: bytes
    ) -> None:
        """Cache attributes read from the store after a miss, unless the scope was
        invalidated since `read` gave `token`."""
        ...

    async def invalidate(self, device_id: str, scope: AttributeScope) -> None: ...


def _check(values: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(values, dict) or not values:
        raise PayloadError("attributes must be a non-empty JSON object")
    if len(values) > MAX_ATTRIBUTES_PER_WRITE:
        raise PayloadError(f"at most {MAX_ATTRIBUTES_PER_WRITE} attributes per write")
    for key, value in values.items():
        if not key or len(key) > MAX_KEY_LENGTH:
            raise PayloadError(f"attribute keys must be 1 to {MAX_KEY_LENGTH} characters")
        if value is None:
            raise PayloadError(f"value of attribute {key!r} is null")
    return values


class TwinValue(msgspec.Struct):
    """One key of a twin side: its value, version and last change (Unix ms)."""

    value: Any
    version: int
    ts: int


class Twin(msgspec.Struct):
    """A device's twin; `*_version` is the highest key version of that side (0: empty)."""

    desired: dict[str, TwinValue]
    reported: dict[str, TwinValue]
    desired_version: int
    reported_version: int


def _side(attributes: list[Attribute]) -> tuple[dict[str, TwinValue], int]:
    values = {a.key: TwinValue(a.value, a.version, a.last_update_ts) for a in attributes}
    return values, max((a.version for a in attributes), default=0)


class AttributeService(Service):
    """Reads and writes attributes; pushes shared changes to live device sessions."""

    name = "attributes"
    stats_counters = frozenset({"broadcast_errors"})

    def __init__(
        self,
        state: StateStore,
        cache: AttributeCache | None = None,
        broadcast: Broadcast | None = None,
    ) -> None:
        """`broadcast`: where SHARED changes cross to other processes (None: this
        process holds every session)."""
        self._state = state
        self._cache = cache
        self._broadcast = broadcast
        self._origin = uuid.uuid4().hex
        self._subscription: Subscription | None = None
        self._uninvalidated: set[tuple[str, AttributeScope]] = set()
        self._listeners: dict[str, list[SharedListener]] = collections.defaultdict(list)
        self.broadcast_errors = 0

    async def start(self) -> None:
        """Subscribe to other processes' changes (the registry opened the store)."""
        if self._broadcast is not None:
            self._subscription = await self._broadcast.subscribe(TOPIC, self._on_broadcast)

    async def stop(self) -> None:
        subscription, self._subscription = self._subscription, None
        if subscription is not None:
            await subscription.close()
        self._listeners.clear()

    def stats(self) -> dict[str, Any]:
        return {"broadcast_errors": self.broadcast_errors} if self._broadcast else {}

    def listen_shared(self, device_id: str, listener: SharedListener) -> Callable[[], None]:
        """Register a live session's listener; returns the function that unregisters it."""
        self._listeners[device_id].append(listener)

        def remove() -> None:
            listeners = self._listeners.get(device_id)
            if listeners and listener in listeners:
                listeners.remove(listener)
                if not listeners:
                    del self._listeners[device_id]

        return remove

    async def get(
        self, device_id: str, scope: AttributeScope, keys: Sequence[str] | None = None
    ) -> list[Attribute]:
        """Attributes of one scope (all keys when None), sorted by key."""
        if self._cache is None:
            return await self._state.get_attributes(device_id, scope, keys)
        every = await self._cached(self._cache, device_id, scope)
        if keys is None:
            return every
        wanted = set(keys)
        return [a for a in every if a.key in wanted]

    async def _cached(
        self, cache: AttributeCache, device_id: str, scope: AttributeScope
    ) -> list[Attribute]:
        """Every attribute of the scope: from the cache, or the store (then cached)."""
        stale = (device_id, scope) in self._uninvalidated
        if stale and not await self._invalidate(cache, device_id, scope):
            return await self._state.get_attributes(device_id, scope, None)
        try:
            cached, token = await cache.read(device_id, scope)
        except IotmeshError:
            return await self._state.get_attributes(device_id, scope, None)
        if cached is not None:
            return cached
        every = await self._state.get_attributes(device_id, scope, None)
        with contextlib.suppress(IotmeshError):  # then the next read is a miss again
            await cache.fill(device_id, scope, every, token)
        return every

    async def _invalidate(
        self, cache: AttributeCache, device_id: str, scope: AttributeScope
    ) -> bool:
        """Invalidate after a change (or retry one that failed); False if it failed."""
        try:
            await cache.invalidate(device_id, scope)
        except IotmeshError as exc:
            log.debug("invalidating attributes of %s failed: %s", device_id, exc)
            if len(self._uninvalidated) < MAX_UNINVALIDATED:
                self._uninvalidated.add((device_id, scope))
            return False
        self._uninvalidated.discard((device_id, scope))
        return True

    async def values(
        self, device_id: str, scope: AttributeScope, keys: Sequence[str] | None = None
    ) -> dict[str, Any]:
        """Like `get`, as a plain key → value map (the form devices receive)."""
        return {a.key: a.value for a in await self.get(device_id, scope, keys)}

    async def twin(self, device_id: str) -> Twin:
        """The device's twin: desired = SHARED attributes, reported = CLIENT ones."""
        desired, desired_version = _side(await self.get(device_id, AttributeScope.SHARED))
        reported, reported_version = _side(await self.get(device_id, AttributeScope.CLIENT))
        return Twin(desired, reported, desired_version, reported_version)

    async def save(
        self, device_id: str, scope: AttributeScope, values: dict[str, Any]
    ) -> list[Attribute]:
        """Store attributes; SHARED changes are then pushed to the device's sessions.

        Raises:
            PayloadError: empty, null values, bad keys, too many.
        """
        saved = await self._state.save_attributes(device_id, scope, _check(values), now_ms())
        if self._cache is not None:
            await self._invalidate(self._cache, device_id, scope)
        if scope is AttributeScope.SHARED:
            await self._notify(device_id, {a.key: a.value for a in saved}, [])
        return saved

    async def delete(self, device_id: str, scope: AttributeScope, keys: Sequence[str]) -> int:
        """Delete attributes; deleted SHARED keys are pushed as `{"deleted": [...]}`."""
        if not keys:
            raise PayloadError("name at least one attribute key to delete")
        count = await self._state.delete_attributes(device_id, scope, keys)
        if self._cache is not None and count:
            await self._invalidate(self._cache, device_id, scope)
        if scope is AttributeScope.SHARED and count:
            await self._notify(device_id, {}, list(keys))
        return count

    async def _notify(self, device_id: str, changed: dict[str, Any], deleted: list[str]) -> None:
        """Push a committed change to this process's listeners, then to the others'."""
        await self._call_listeners(device_id, changed, deleted)
        if self._broadcast is None:
            return
        change = SharedChange(self._origin, device_id, changed, deleted)
        try:
            await self._broadcast.publish(TOPIC, msgspec.json.encode(change))
        except IotmeshError as exc:  # live pushes only: the store has the change
            self.broadcast_errors += 1
            log.warning("shared attributes of %s not pushed to other processes: %s", device_id, exc)

    async def _on_broadcast(self, data: bytes | None) -> None:
        if data is None:
            return  # changes missed meanwhile: devices read the store when they ask
        try:
            change = msgspec.json.decode(data, type=SharedChange)
        except msgspec.DecodeError:
            log.warning("an undecodable shared-attribute broadcast was ignored")
            return
        if change.origin != self._origin and change.device_id in self._listeners:
            await self._call_listeners(change.device_id, change.changed, change.deleted)

    async def _call_listeners(
        self, device_id: str, changed: dict[str, Any], deleted: list[str]
    ) -> None:
        for listener in list(self._listeners.get(device_id, ())):
            try:
                await listener(changed, deleted)
            except Exception:
                log.exception("pushing shared attributes to device %s failed", device_id)


async def requested_values(
    attributes: AttributeService,
    device_id: str,
    client_keys: list[str] | None,
    shared_keys: list[str] | None,
) -> dict[str, Any]:
    """A device's attribute request (`clientKeys`, `sharedKeys`), answered in the
    ThingsBoard form `{"client": {...}, "shared": {...}}`: both scopes in full when no
    keys are named, else only the scopes whose keys are named."""
    everything = client_keys is None and shared_keys is None
    answer: dict[str, Any] = {}
    if everything or client_keys:
        answer["client"] = await attributes.values(device_id, AttributeScope.CLIENT, client_keys)
    if everything or shared_keys:
        answer["shared"] = await attributes.values(device_id, AttributeScope.SHARED, shared_keys)
    return answer
