"""HTTP calls between services over `Discovery` (httpx, HTTP/1.1 or h2).

`ServiceHttp.request("GET", "/path", key=device_id)` sends the request to an
instance's first address (`http://host:port`), with the discovery client's policy,
timeout, retries and breakers. What is retried on another instance:

- the connection could not be made (nothing was sent): always;
- a timeout, a dropped connection or 502/503/504: only for idempotent methods (GET,
  HEAD, OPTIONS, PUT, DELETE), since a POST may have taken effect.

Any other answer, 4xx included, is returned as it is: the service answered.
"""

from __future__ import annotations

from typing import Any

import httpx

from iotmesh.cluster.discovery import Discovery
from iotmesh.cluster.model import Instance

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
RETRY_STATUS = frozenset({502, 503, 504})


class RetryableStatus(Exception):
    """An answer that says "try elsewhere" (502/503/504); carries the response."""

    def __init__(self, response: httpx.Response) -> None:
        super().__init__(f"HTTP {response.status_code}")
        self.response = response


class ServiceHttp:
    """Requests to one service; the caller owns `client` (and closes it)."""

    def __init__(self, discovery: Discovery, client: httpx.AsyncClient) -> None:
        self.discovery = discovery
        self.client = client

    async def request(
        self, method: str, path: str, *, key: str | None = None, **kwargs: Any
    ) -> httpx.Response:
        """Send to an instance, failing over; see the module docstring.

        Raises:
            NoInstance, CallFailed: as `Discovery.call`.
            httpx.HTTPError: a non-retryable transport failure.
        """
        method = method.upper()
        idempotent = method in IDEMPOTENT

        async def attempt(instance: Instance) -> httpx.Response:
            if not instance.addresses:
                raise httpx.ConnectError(f"{instance.key} has no address")
            url = instance.addresses[0].rstrip("/") + path
            response = await self.client.request(method, url, **kwargs)
            if response.status_code in RETRY_STATUS:
                raise RetryableStatus(response)
            return response

        def retryable(exc: BaseException) -> bool:
            if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
                return True
            if isinstance(exc, TimeoutError | httpx.TransportError | RetryableStatus):
                return idempotent
            return False

        try:
            return await self.discovery.call(attempt, key=key, retryable=retryable)
        except RetryableStatus as exc:  # a POST answered 503: the caller decides
            return exc.response

    async def get(self, path: str, *, key: str | None = None, **kwargs: Any) -> httpx.Response:
        return await self.request("GET", path, key=key, **kwargs)

    async def post(self, path: str, *, key: str | None = None, **kwargs: Any) -> httpx.Response:
        return await self.request("POST", path, key=key, **kwargs)
