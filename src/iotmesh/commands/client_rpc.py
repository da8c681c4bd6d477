"""Client-side RPC: a device asks the platform to run a method.

ThingsBoard hands these requests to its rule engine. iotmesh has no rule engine yet, so
it answers a small set of built-in methods and refuses others with an error object
(the device still gets a reply, so it never hangs waiting):

    getCurrentTime    → {"time": <server time, Unix ms>}
    getSessionLimits  → the transport's limits, in the form ThingsBoard's device SDK
                        (tb-mqtt-client) asks for right after it connects
    ping              → {"pong": true}
"""

from __future__ import annotations

from typing import Any

from iotmesh.core.clock import now_ms


def answer_client_rpc(
    method: Any, params: Any, session_limits: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The platform's reply to a device's RPC request."""
    if method == "getSessionLimits" and session_limits is not None:
        return session_limits
    if method == "getCurrentTime":
        return {"time": now_ms()}
    if method == "ping":
        return {"pong": True}
    return {"error": f"unsupported method: {method!r}"}
