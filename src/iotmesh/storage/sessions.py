"""The MQTT session store interface: persistent sessions, their messages, retained messages.

An MQTT client that asks for a persistent session (v3.1.1 Clean Session 0, v5 Session
Expiry Interval > 0) keeps its subscriptions while it is away, and QoS 1/2 messages are
queued for it; the broker keeps the last retained message of every topic. This store
lets that state outlive a restart of the server.

Implementations: SQLite (`storage/sqlite/sessions.py`, its own file in the data dir so
that session churn does not contend with the state store's writes); PostgreSQL or
Redis later, behind the same interface.

Model:
    StoredSession       client id, device, protocol version, expiry, disconnect time,
                        and its subscriptions (`StoredSubscription`).
    StoredMessage       one QoS 1/2 message held for a session. `seq` is unique in the
                        whole store and grows with time, so a session's messages are
                        delivered in `seq` order.
    StoredRetained      the retained message of one topic, with the time it was
                        stored (MQTT 5 message expiry counts from it).

Writes are a list of operations (`SaveSession`, `DeleteSession`, `QueuePut`,
`QueueRemove`, `RetainPut`, `RetainDelete`) applied in order, all or nothing: the
caller batches what piled up into one `write`, so one commit serves many changes
(group commit).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import msgspec


class StoredSubscription(msgspec.Struct, frozen=True):
    """A granted subscription with its options (v3.1.1 clients use only `qos`)."""

    topic_filter: str  # as the client sent it, `$share/{group}/...` included
    qos: int
    no_local: bool = False
    retain_as_published: bool = False
    retain_handling: int = 0
    identifier: int | None = None  # v5 subscription identifier
    shared_group: str | None = None


class StoredSession(msgspec.Struct):
    """What the server remembers of one client id, without its messages."""

    client_id: str
    device_id: str | None  # the device the client logged in as; None: anonymous
    protocol_version: int  # 4 (v3.1.1) or 5
    expiry_s: int  # how long the session outlives its connection
    disconnected_ms: int | None  # Unix ms of the disconnect; None: connected when written
    subscriptions: list[StoredSubscription] = msgspec.field(default_factory=list)


class StoredMessage(msgspec.Struct, frozen=True):
    """One QoS 1/2 message held for a session.

    `packet_id` is set when the message was in flight (sent, not yet acknowledged) when
    it was written: it is sent again with that packet id and DUP set. `released` (QoS 2
    only) means the client sent PUBREC: only the PUBREL is still owed.
    """

    seq: int
    topic: str
    payload: bytes
    qos: int
    retain: bool = False
    properties: bytes | None = None  # the transport's encoding; opaque to the store
    queued_ms: int = 0  # Unix ms when it was queued (MQTT 5 message expiry counts from it)
    packet_id: int | None = None
    released: bool = False


class SessionRecord(msgspec.Struct):
    """A stored session and its messages, in `seq` order (what `load_all` returns)."""

    session: StoredSession
    messages: list[StoredMessage]


class StoredRetained(msgspec.Struct, frozen=True):
    """The retained message of one topic (at most one per topic, MQTT 3.3.1.3)."""

    topic: str
    payload: bytes  # never empty: an empty retained payload deletes (`RetainPut`)
    qos: int
    properties: bytes | None = None  # the transport's encoding, as in `StoredMessage`
    stored_ms: int = 0  # Unix ms when it was retained (MQTT 5 message expiry counts from it)


class SaveSession(msgspec.Struct, tag=True):
    """Insert or replace a session and its subscriptions; its messages stay."""

    session: StoredSession


class DeleteSession(msgspec.Struct, tag=True):
    """Forget a session, its subscriptions and its messages (no error if unknown)."""

    client_id: str


class QueuePut(msgspec.Struct, tag=True):
    """Store messages for a session; one with a `seq` already stored replaces it."""

    client_id: str
    messages: list[StoredMessage]


class QueueRemove(msgspec.Struct, tag=True):
    """Remove messages (acknowledged or expired) by `seq`; unknown ones are ignored."""

    client_id: str
    seqs: list[int]


class RetainPut(msgspec.Struct, tag=True):
    """Make `message` the retained message of its topic, replacing the one stored.

    As in MQTT, an empty payload means "no retained message": it deletes instead.
    """

    message: StoredRetained


class RetainDelete(msgspec.Struct, tag=True):
    """Forget the retained message of `topic` (cleared or expired; no error if none)."""

    topic: str


SessionWrite = SaveSession | DeleteSession | QueuePut | QueueRemove | RetainPut | RetainDelete


class SessionStore(Protocol):
    """Durable MQTT sessions.

    Resource handling: `open` must be awaited before use and `close` after.
    """

    async def open(self) -> None:
        """Create or upgrade the schema, open connections.

        Raises:
            StorageError: the store cannot be opened (or was written by a newer release).
        """

    async def close(self) -> None:
        """Release connections (waits for a write in progress)."""

    async def load_all(self) -> list[SessionRecord]:
        """Every stored session with its messages."""

    async def load_retained(self) -> list[StoredRetained]:
        """Every stored retained message (expired ones too: the caller decides)."""

    async def write(self, ops: Sequence[SessionWrite]) -> None:
        """Apply `ops` in order in one transaction; durable when it returns.

        Raises:
            StorageError: the backend failed; none of `ops` was applied.
        """
