"""Routing between MQTT clients: subscriptions, shared subscriptions, retained messages.

This is the "real broker" half of the server, for topics outside the device API.
Device topics (`v1/devices/me/...`, `v1/gateway/...`) never pass through here: they
are the platform's API, handled in `device_api`.

Shared subscriptions (`$share/{group}/{filter}`): each message goes to one member of
the group, round robin, preferring members that are connected.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from typing import Any

from iotmesh.proto.mqtt import (
    MqttError,
    Publish,
    Subscription,
    TopicTree,
    parse_shared,
    topic_matches,
)
from iotmesh.transports.mqtt.session import Session, SubscriptionEntry, copy_for

log = logging.getLogger(__name__)


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

    def __init__(self, may_receive: Callable[[Session, str], bool] | None = None) -> None:
        self._may_receive = may_receive or (lambda session, topic: True)
        self._tree: TopicTree[Any, Any] = TopicTree()
        self.retained: dict[str, Publish] = {}
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
                self.retained[message.topic] = message
            else:
                self.retained.pop(message.topic, None)
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

    def retained_for(self, topic_filter: str) -> list[Publish]:
        """Retained messages a new subscription to `topic_filter` receives."""
        shared = parse_shared(topic_filter)
        if shared is not None:
            return []  # MQTT 4.8.2: retained messages are not sent to shared subscriptions
        return [m for topic, m in self.retained.items() if topic_matches(topic_filter, topic)]

    def retained_for_session(self, session: Session, topic_filter: str) -> list[Publish]:
        """Like `retained_for`, without topics the session may not receive."""
        return [m for m in self.retained_for(topic_filter) if self._may_receive(session, m.topic)]


def granted_copy(message: Publish, options: Subscription, identifier: int | None) -> Publish:
    """A retained message as a new subscriber receives it (retain flag set)."""
    ids = [identifier] if identifier else []
    return copy_for(message, min(message.qos, options.qos), True, ids)
