"""Who a client is (CONNECT authentication) and what it may touch (ACL).

Authentication, as ThingsBoard devices expect, tries in this order:

1. over TLS, a client certificate whose SHA-256 fingerprint is registered for a device
   (X.509 credentials);
2. with a user name and a password: the device's MQTT Basic credentials with this user
   name (and this client id, when the credentials have one);
3. the user name as the device's access token (any password is ignored);
4. with a user name and no password: MQTT Basic credentials that need no password (or
   "bad user name or password" when they need one);
5. MQTT Basic credentials made of this client id alone (user name and password ignored).

Nothing matched: refused with "not authorized" (v5 0x87, v3.1.1 return code 5), like an
unknown token in ThingsBoard; with no credentials at all the client is anonymous,
accepted only when `mqtt.allow_anonymous` is set (never when it presented an unknown
certificate). MQTT Basic credentials that match with a wrong or missing password are
refused with "bad user name or password" (v5 0x86, v3.1.1 return code 4), without
trying the later steps.

Authorisation: a device may use its own `v1/devices/me/...` topics; a gateway also
`v1/gateway/...`. Every other topic is decided by `mqtt.acl`: the first rule whose
filter covers the topic (or the subscription's filter) and whose `clients` and
`action` fit decides; no matching rule denies.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from iotmesh.core.errors import AuthError, IotmeshError
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


async def _basic(
    registry: DeviceRegistry, client_id: str | None, username: str, password: bytes | None
) -> Device | None:
    try:
        return await registry.authenticate_basic(client_id, username, password)
    except AuthError as exc:
        raise LoginRefused(ReasonCode.BAD_USER_NAME_OR_PASSWORD, str(exc)) from None


async def authenticate(
    connect: Connect,
    registry: DeviceRegistry,
    allow_anonymous: bool,
    client_certificate: bytes | None = None,
) -> Principal:
    """Decide who the client is, in the order the module docstring gives.

    Args:
        client_certificate: the DER certificate the client presented over TLS, if any;
            a registered one identifies the device without a token.

    Raises:
        LoginRefused: wrong password for MQTT Basic credentials (bad user name or
            password); unknown credentials, or none where anonymous is not allowed
            (not authorized).
    """
    refusal: IotmeshError | None = None
    if client_certificate is not None:
        try:
            return Principal(await registry.authenticate_certificate(client_certificate))
        except AuthError as exc:
            refusal = exc
    client_id = connect.client_id or None
    username = connect.username or None
    password = connect.password
    if username is not None:
        device = None
        if password is not None:
            device = await _basic(registry, client_id, username, password)
        if device is None:
            try:
                device = await registry.authenticate(username)
            except AuthError as exc:
                refusal = exc
        if device is None and password is None:
            device = await _basic(registry, client_id, username, None)
        if device is not None:
            return Principal(device)
    if client_id is not None:
        device = await registry.authenticate_basic(client_id, None, None)
        if device is not None:
            return Principal(device)
    if refusal is not None:
        raise LoginRefused(ReasonCode.NOT_AUTHORIZED, str(refusal))
    if allow_anonymous:
        return Principal(None)
    raise LoginRefused(
        ReasonCode.NOT_AUTHORIZED,
        "no credentials: the user name must be the access token, or use MQTT Basic credentials",
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
