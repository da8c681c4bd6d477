"""Routing between MQTT clients: subscriptions, shared subscriptions, retained messages.

This is the "real broker" half of the server, for topics outside the device API.
Device topics (`v1/devices/me/...`, `v1/gateway/...`) never pass through here: they
are the platform's API, handled in `device_api`.

Shared subscriptions (`$share/{group}/{filter}`): each message goes to one member of
the group, round robin, preferring members that are connected.

Retained messages: the last retained message of each topic (an empty payload clears
it). A v5 Message Expiry Interval counts from when it was retained: an expired one is
never sent and is dropped, and a live one is sent with the time it waited taken off
(MQTT 3.3.2.3.3). With a `keeper` (`persistence.SessionPersistence`) every change is
also reported for the session store, so retained messages outlive a restart.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from iotmesh.proto.mqtt import (
    MqttError,
    Publish,
    Subscription,
    TopicTree,
    parse_shared,
    topic_matches,
)
from iotmesh.transports.mqtt.session import Session, SubscriptionEntry, copy_for, unexpired

log = logging.getLogger(__name__)


class RetainKeeper(Protocol):
    """Where retained messages outlive a restart (see `persistence.py`)."""

    def retained(self, message: Publish) -> None:
        """`message` is now the retained message of its topic: store it."""

    def retain_cleared(self, topic: str) -> None:
        """`topic` has no retained message any more (cleared or expired): forget it."""


class _Retained:
    __slots__ = ("at", "message")

    def __init__(self, message: Publish, at: float) -> None:
        self.message = message
        self.at = at  # monotonic time it was retained; message expiry counts from it


class _SharedGroup:
    __slots__ = ("members", "turn")

    def __init__(self) -> None:
        self.members: dict[str, tuple[Session, SubscriptionEntry]] = {}
        self.turn = itertools.count()

    def pick(self) -> tuple[Session, SubscriptionEntry] | None:
        members = list(self.members.values())
        if not members:
            return None
        online = [m for m in members if m[0].connection is not None] or members
        return online[next(self.turn) % len(online)]


class Broker:
    """Subscriptions of every session, and the retained messages.

    `may_receive(session, topic)` is asked for every delivery: a subscription granted
    on a wildcard must not carry a topic the ACL forbids that client to subscribe to.
    """

    def __init__(
        self,
        may_receive: Callable[[Session, str], bool] | None = None,
        keeper: RetainKeeper | None = None,
    ) -> None:
        self._may_receive = may_receive or (lambda session, topic: True)
        self._tree: TopicTree[Any, Any] = TopicTree()
        self._retained: dict[str, _Retained] = {}
        self._expiring: dict[str, float] = {}  # topic -> monotonic deadline, v5 expiry only
        self.keeper = keeper  # None: retained messages live in memory only
        self.routed = 0

    def subscribe(self, session: Session, topic_filter: str, entry: SubscriptionEntry) -> bool:
        """Add or replace a subscription; True when it is new."""
        shared = parse_shared(topic_filter)
        if shared is None:
            return self._tree.add(topic_filter, session.client_id, (session, entry))
        key = ("$share", shared.group)
        group: _SharedGroup | None = self._tree.get(shared.topic_filter, key)
        if group is None:
            group = _SharedGroup()
            self._tree.add(shared.topic_filter, key, group)
        new = session.client_id not in group.members
        group.members[session.client_id] = (session, entry)
        return new

    def unsubscribe(self, session: Session, topic_filter: str) -> bool:
        """Remove a subscription; True when it existed."""
        shared = parse_shared(topic_filter)
        if shared is None:
            return self._tree.remove(topic_filter, session.client_id) is not None
        key = ("$share", shared.group)
        group: _SharedGroup | None = self._tree.get(shared.topic_filter, key)
        if group is None or group.members.pop(session.client_id, None) is None:
            return False
        if not group.members:
            self._tree.remove(shared.topic_filter, key)
        return True

    def drop_session(self, session: Session) -> None:
        """Remove every subscription of a session that ends."""
        for topic_filter in list(session.subscriptions):
            self.unsubscribe(session, topic_filter)

    def publish(self, message: Publish, sender: Session | None) -> int:
        """Route a message to every matching subscriber; return how many got it.

        A subscriber matching through several filters gets one copy, at the highest QoS
        granted, carrying every matching subscription identifier (MQTT 3.3.4).
        """
        if message.retain:
            if message.payload:
                self.load(message, time.monotonic())
                if self.keeper is not None:
                    self.keeper.retained(message)
            else:
                self._drop_retained(message.topic)
        targets: dict[str, tuple[Session, int, bool, list[int]]] = {}
        for value in self._tree.match(message.topic):
            if isinstance(value, _SharedGroup):
                picked = value.pick()
                if picked is None:
                    continue
                session, entry = picked
            else:
                session, entry = value
                if entry.options.no_local and session is sender:
                    continue
            qos = min(message.qos, entry.options.qos)
            retain = message.retain and entry.options.retain_as_published
            ids = [entry.identifier] if entry.identifier else []
            known = targets.get(session.client_id)
            if known is not None:
                qos = max(qos, known[1])
                retain = retain or known[2]
                ids = known[3] + ids
            targets[session.client_id] = (session, qos, retain, ids)
        delivered = 0
        for session, qos, retain, ids in targets.values():
            if not self._may_receive(session, message.topic):
                continue
            try:
                session.deliver(copy_for(message, qos, retain, ids))
            except MqttError:  # our own fault (an unencodable copy): skip this one only
                log.exception("delivering %r to %s failed", message.topic, session.client_id)
                continue
            delivered += 1
        self.routed += delivered
        return delivered

    # -- retained messages ----------------------------------------------------------------

    def load(self, message: Publish, at: float) -> None:
        """Hold `message` as its topic's retained message, retained at monotonic `at`
        (in the past for one loaded from the session store); the keeper is not told."""
        self._retained[message.topic] = _Retained(message, at)
        expiry = message.properties.message_expiry_interval
        if expiry is None:
            self._expiring.pop(message.topic, None)
        else:
            self._expiring[message.topic] = at + expiry

    def _drop_retained(self, topic: str) -> None:
        self._retained.pop(topic, None)
        self._expiring.pop(topic, None)
        # Told even when nothing was held: a clear whose write failed must be able to be
        # sent again (the stored copy would otherwise come back at the next start).
        if self.keeper is not None:
            self.keeper.retain_cleared(topic)

    def expire_retained(self, now: float) -> int:
        """Drop retained messages whose v5 Message Expiry Interval has passed."""
        due = [topic for topic, deadline in self._expiring.items() if deadline <= now]
        for topic in due:
            self._drop_retained(topic)
        return len(due)

    def retained_for(self, topic_filter: str) -> list[Publish]:
        """Retained messages a new subscription to `topic_filter` receives, their
        expiry intervals reduced by the time they were held; expired ones are dropped."""
        shared = parse_shared(topic_filter)
        if shared is not None:
            return []  # MQTT 4.8.2: retained messages are not sent to shared subscriptions
        now = time.monotonic()
        found: list[Publish] = []
        expired: list[str] = []
        for topic, held in self._retained.items():
            if not topic_matches(topic_filter, topic):
                continue
            fresh = unexpired(held.message, now - held.at)
            if fresh is None:
                expired.append(topic)
            else:
                found.append(fresh)
        for topic in expired:
            self._drop_retained(topic)
        return found

    def retained_for_session(self, session: Session, topic_filter: str) -> list[Publish]:
        """Like `retained_for`, without topics the session may not receive."""
        return [m for m in self.retained_for(topic_filter) if self._may_receive(session, m.topic)]


def granted_copy(message: Publish, options: Subscription, identifier: int | None) -> Publish:
    """A retained message as a new subscriber receives it (retain flag set)."""
    ids = [identifier] if identifier else []
    return copy_for(message, min(message.qos, options.qos), True, ids)
