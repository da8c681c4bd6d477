"""What the registry holds about one running instance."""

from __future__ import annotations

import re

import msgspec

NAME = re.compile(r"[A-Za-z0-9_-]+")


class Instance(msgspec.Struct, frozen=True, kw_only=True):
    """One registered instance of a service, as its last heartbeat wrote it.

    `seq` grows by one per heartbeat: a reader that sees it change has observed a
    heartbeat (the failure detector's input). `heartbeat_ms` is the writer's wall clock
    (ages shown by `iotmesh services` assume clocks kept by NTP).
    """

    service: str
    instance_id: str
    addresses: list[str] = msgspec.field(default_factory=list)
    version: str = ""
    started_ms: int = 0
    heartbeat_ms: int = 0
    interval_s: float = 1.0
    seq: int = 0
    load: float = 0.0  # in-flight requests or connections, as the instance counts them
    health: str = "ok"  # "ok", "degraded" or "draining" (draining: take no new work)
    metadata: dict[str, str] = msgspec.field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.service}.{self.instance_id}"


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Instance)


def encode(instance: Instance) -> bytes:
    return _encoder.encode(instance)


def decode(data: bytes) -> Instance:
    """Raises msgspec.DecodeError on a malformed entry."""
    return _decoder.decode(data)


def check_name(kind: str, name: str) -> str:
    """`name` if fit for engine keys (letters, digits, '-', '_'); else ValueError."""
    if not NAME.fullmatch(name):
        raise ValueError(f"{kind} {name!r}: use letters, digits, '-' and '_' only")
    return name
