"""Who a client is (CONNECT authentication) and what it may touch (ACL).

Authentication, as ThingsBoard devices expect: the MQTT user name is the device's
access token (the password is ignored), or, over TLS, a client certificate whose
SHA-256 fingerprint is registered for the device (X.509 credentials). Without either
the client is anonymous, accepted only when `mqtt.allow_anonymous` is set. An unknown
token is refused with "not authorized" (v5 0x87, v3.1.1 return code 5), like
ThingsBoard.

Authorisation: a device may use its own `v1/devices/me/...` topics; a gateway also
`v1/gateway/...`. Every other topic is decided by `mqtt.acl`: the first rule whose
filter covers the topic (or the subscription's filter) and whose `clients` and
`action` fit decides; no matching rule denies.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from iotmesh.core.errors import AuthError
from iotmesh.core.settings import AclRule
from iotmesh.core.types import Device
from iotmesh.proto.mqtt import Connect, ReasonCode, parse_shared, topic_matches
from iotmesh.registry.service import DeviceRegistry

DEVICE_PREFIX = "v1/devices/me/"
GATEWAY_PREFIX = "v1/gateway/"

Action = Literal["publish", "subscribe"]


class Principal:
    """The authenticated identity behind a connection."""

    __slots__ = ("device", "kind")

    def __init__(self, device: Device | None) -> None:
        self.device = device
        if device is None:
            self.kind = "anonymous"
        else:
            self.kind = "gateways" if device.gateway else "devices"


class LoginRefused(Exception):
    """CONNECT is refused with this reason code."""

    def __init__(self, reason: ReasonCode, message: str) -> None:
        super().__init__(message)
        self.reason = reason


async def authenticate(
    connect: Connect,
    registry: DeviceRegistry,
    allow_anonymous: bool,
    client_certificate: bytes | None = None,
) -> Principal:
    """Decide who the client is.

    Args:
        client_certificate: the DER certificate the client presented over TLS, if any;
            a registered one identifies the device without a token.

    Raises:
        LoginRefused: unknown token, or no credentials where anonymous is not allowed.
    """
    if client_certificate is not None:
        try:
            return Principal(await registry.authenticate_certificate(client_certificate))
        except AuthError:
            if not connect.username:
                raise LoginRefused(
                    ReasonCode.NOT_AUTHORIZED, "unknown client certificate"
                ) from None
    if connect.username:
        try:
            return Principal(await registry.authenticate(connect.username))
        except AuthError as exc:
            raise LoginRefused(ReasonCode.NOT_AUTHORIZED, str(exc)) from None
    if allow_anonymous:
        return Principal(None)
    raise LoginRefused(
        ReasonCode.NOT_AUTHORIZED, "no credentials: the user name must be the access token"
    )


def _rule_applies(rule: AclRule, principal: Principal, action: Action) -> bool:
    if rule.action != "all" and rule.action != action:
        return False
    if rule.clients == "any":
        return True
    if rule.clients == "devices":
        return principal.device is not None
    return rule.clients == principal.kind


def allowed(principal: Principal, topic: str, action: Action, rules: Sequence[AclRule]) -> bool:
    """May `principal` publish to `topic` / subscribe to the filter `topic`?"""
    shared = parse_shared(topic) if action == "subscribe" else None
    if shared is not None:
        topic = shared.topic_filter
    if topic.startswith(DEVICE_PREFIX):
        return principal.device is not None
    if topic.startswith(GATEWAY_PREFIX):
        return principal.device is not None and principal.device.gateway
    for rule in rules:
        if _rule_applies(rule, principal, action) and topic_matches(rule.topic, topic):
            return rule.allow
    return False
