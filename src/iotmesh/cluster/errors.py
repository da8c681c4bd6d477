"""Errors of the cluster layer.

IotmeshError
└── ClusterError           the registry, an election or a call between services failed
    ├── NoInstance         no healthy instance of the service is left to try
    │                      (also Overloaded: the caller should retry later)
    ├── CallFailed         every attempt of a service-to-service call failed
    └── StaleToken         a fenced write carried a token older than one already seen
"""

from __future__ import annotations

from iotmesh.core.errors import IotmeshError, Overloaded


class ClusterError(IotmeshError):
    """The cluster engine or a call between services failed."""


class NoInstance(ClusterError, Overloaded):
    """No instance of the service is healthy with a closed (or half-open) breaker."""

    def __init__(self, service: str, retry_after: float = 1.0) -> None:
        Overloaded.__init__(self, f"no healthy instance of {service!r}", retry_after)
        self.service = service


class CallFailed(ClusterError):
    """Every attempt failed; `attempts` says which instance failed how."""

    def __init__(self, service: str, attempts: list[tuple[str, str]]) -> None:
        tried = "; ".join(f"{inst}: {why}" for inst, why in attempts)
        super().__init__(f"call to {service!r} failed after {len(attempts)} attempts ({tried})")
        self.service = service
        self.attempts = attempts


class StaleToken(ClusterError):
    """A write with fencing token `token` came after one with `highest` (a newer leader)."""

    def __init__(self, resource: str, token: int, highest: int) -> None:
        super().__init__(
            f"write to {resource!r} refused: fencing token {token} is older than {highest}"
        )
        self.resource = resource
        self.token = token
        self.highest = highest
