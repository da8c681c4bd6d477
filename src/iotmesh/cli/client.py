"""The REST client behind the CLI's device and telemetry commands.

Where the server is: `--url`, else `IOTMESH_URL`, else the run.json of the data dir
(written by a running `iotmesh run`), else http://127.0.0.1:8080. The admin token:
`--token`, else `IOTMESH_ADMIN_TOKEN`, else the data dir's `admin_token` file.
"""

from __future__ import annotations

import http
from pathlib import Path
from typing import Any

import httpx

from iotmesh.core.errors import IotmeshError
from iotmesh.core.ids import is_uuid
from iotmesh.datadir import read_admin_token, read_run_info

DEFAULT_URL = "http://127.0.0.1:8080"


class ClientError(IotmeshError):
    """The server refused a request or could not be reached; the message says why."""


def resolve_url(url: str | None, data_dir: Path) -> str:
    """The server URL from the flag, or the running server's run.json, or the default."""
    if url:
        return url.rstrip("/")
    info = read_run_info(data_dir)
    if info is not None:
        return str(info["http"]["url"])
    return DEFAULT_URL


class ApiClient:
    """A small synchronous client of the REST API."""

    def __init__(self, url: str, token: str | None, timeout: float = 30.0) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=url, headers=headers, timeout=timeout)
        self.url = url

    @classmethod
    def from_options(cls, url: str | None, token: str | None, data_dir: Path) -> ApiClient:
        """Build a client from CLI options, falling back on the data dir."""
        return cls(resolve_url(url, data_dir), token or read_admin_token(data_dir))

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """Send a request and return the decoded JSON body (None for 204).

        Raises:
            ClientError: with the problem+json detail, or why the server was unreachable.
        """
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ClientError(
                f"cannot reach iotmesh at {self.url} ({exc}); is `iotmesh run` running?"
            ) from exc
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            phrase = http.HTTPStatus(response.status_code).phrase
            raise ClientError(f"{response.status_code} {phrase}: {detail}")
        return None if response.status_code == 204 or not response.content else response.json()

    def device_id(self, ref: str) -> str:
        """Resolve a device given by id or by exact name."""
        if is_uuid(ref):
            return ref
        page = self.request(
            "GET", "/api/v1/devices", params={"text_search": ref, "page_size": 1000}
        )
        for device in page["data"]:
            if device["name"] == ref:
                return str(device["id"])
        raise ClientError(f"no device named {ref!r}")
