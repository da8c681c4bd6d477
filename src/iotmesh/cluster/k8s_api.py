"""A small client of the Kubernetes API for Lease objects (coordination.k8s.io/v1).

Only the calls the Kubernetes cluster backend makes: get, list by label selector,
create, replace at a resourceVersion, delete (optionally at a resourceVersion). On
httpx, without a Kubernetes client package: six calls on one resource do not need one.

Where the API is (`ApiConfig.from_settings`): `cluster.k8s_api_url`, which settings
fill in a pod from `KUBERNETES_SERVICE_HOST`/`_PORT`; the bearer token from
`cluster.k8s_token_file` (the pod's service-account token by default, re-read every
minute because projected tokens rotate); the CA from `cluster.k8s_ca_file`; the
namespace from `cluster.k8s_namespace` or the pod's service-account namespace file.

Error handling: every failure is a `ClusterError`; two of them are answers that the
backend handles rather than failures:

    ClusterError
    ├── Conflict    409: the object changed since it was read, or exists already:
    │               another writer won the race
    └── NotFound    404: no such object (deleted meanwhile)

401 says to check the token, 403 names the RBAC verbs and resource the service
account needs, a connection error names the URL; any other answer carries the API's
own message.
"""

from __future__ import annotations

import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from iotmesh.cluster.errors import ClusterError
from iotmesh.core.settings import SERVICE_ACCOUNT_DIR, ClusterSettings

LEASES = "leases.coordination.k8s.io"
RBAC_HINT = (
    "the service account needs a Role granting get, list, create, update and delete on"
    f" {LEASES} in this namespace (docs/kubernetes-rbac.yaml)"
)
TOKEN_REREAD_S = 60.0  # as client-go: projected service-account tokens rotate


class Conflict(ClusterError):
    """409: the object was changed (or made) by another writer since it was read."""


class NotFound(ClusterError):
    """404: the object does not exist."""


@dataclass(frozen=True)
class ApiConfig:
    """Where the API server is and how to authenticate to it."""

    url: str
    namespace: str
    token_file: Path | None
    ca_file: Path | None

    @classmethod
    def from_settings(cls, settings: ClusterSettings) -> ApiConfig:
        """Raises ClusterError when neither settings nor a pod say where the API is."""
        if not settings.k8s_api_url:
            raise ClusterError(
                "cluster.backend is kubernetes but no API server is known: not in a pod"
                " (KUBERNETES_SERVICE_HOST unset) and cluster.k8s_api_url unset"
            )
        namespace = settings.k8s_namespace
        if namespace is None:
            ns_file = Path(SERVICE_ACCOUNT_DIR, "namespace")
            try:
                namespace = ns_file.read_text().strip()
            except OSError as exc:
                raise ClusterError(
                    f"cannot read the pod's namespace from {ns_file} ({exc}):"
                    " set cluster.k8s_namespace"
                ) from exc
        return cls(
            settings.k8s_api_url.rstrip("/"),
            namespace,
            settings.k8s_token_file,
            settings.k8s_ca_file,
        )


class LeaseApi:
    """Lease objects of one namespace; `open` before use, `close` after."""

    def __init__(self, config: ApiConfig, timeout_s: float = 5.0) -> None:
        self.config = config
        self._timeout_s = timeout_s
        self._client: httpx.AsyncClient | None = None
        self._token: str | None = None
        self._token_read_at = -TOKEN_REREAD_S
        self._path = f"/apis/coordination.k8s.io/v1/namespaces/{config.namespace}/leases"

    async def open(self) -> None:
        verify: ssl.SSLContext | bool = True
        if self.config.url.startswith("https:") and self.config.ca_file is not None:
            try:
                verify = ssl.create_default_context(cafile=str(self.config.ca_file))
            except OSError as exc:
                raise ClusterError(
                    f"cannot load the Kubernetes CA {self.config.ca_file} ({exc}):"
                    " set cluster.k8s_ca_file"
                ) from exc
        self._auth_header()  # an unreadable token file fails start-up, not the first call
        self._client = httpx.AsyncClient(
            base_url=self.config.url, verify=verify, timeout=self._timeout_s
        )

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def get(self, name: str) -> dict[str, Any] | None:
        try:
            return await self._call("get", "GET", name)
        except NotFound:
            return None

    async def list(self, labels: dict[str, str], limit: int | None = None) -> list[dict[str, Any]]:
        """The Leases carrying every label of `labels` (one page: up to `limit`)."""
        params: dict[str, str | int] = {
            "labelSelector": ",".join(f"{k}={v}" for k, v in labels.items())
        }
        if limit is not None:
            params["limit"] = limit
        found = await self._call("list", "GET", None, params=params)
        items: list[dict[str, Any]] = found.get("items") or []
        return items

    async def create(self, lease: dict[str, Any]) -> dict[str, Any]:
        """Raises Conflict when a Lease of that name exists."""
        return await self._call("create", "POST", None, json=lease)

    async def replace(self, lease: dict[str, Any]) -> dict[str, Any]:
        """Write `lease` over the stored one if its `metadata.resourceVersion` is still
        current. Raises Conflict when it is not, NotFound when the Lease is gone."""
        return await self._call("update", "PUT", lease["metadata"]["name"], json=lease)

    async def delete(self, name: str, resource_version: str | None = None) -> None:
        """Delete `name` (only at `resource_version` if given). Raises Conflict when it
        changed, NotFound when it is gone."""
        body = None
        if resource_version is not None:
            body = {
                "apiVersion": "v1",
                "kind": "DeleteOptions",
                "preconditions": {"resourceVersion": resource_version},
            }
        await self._call("delete", "DELETE", name, json=body)

    def _auth_header(self) -> dict[str, str]:
        token_file = self.config.token_file
        if token_file is None:
            return {}
        now = time.monotonic()
        if self._token is None or now - self._token_read_at >= TOKEN_REREAD_S:
            try:
                self._token = token_file.read_text().strip()
            except OSError as exc:
                if self._token is None:
                    raise ClusterError(
                        f"cannot read the Kubernetes token {token_file} ({exc}):"
                        " set cluster.k8s_token_file"
                    ) from exc
                # Keep the last token: a rotation in progress, it may still be valid.
            self._token_read_at = now
        return {"Authorization": f"Bearer {self._token}"}

    async def _call(
        self, verb: str, method: str, name: str | None, **kwargs: Any
    ) -> dict[str, Any]:
        if self._client is None:
            raise ClusterError("the cluster backend is stopped")
        path = self._path if name is None else f"{self._path}/{name}"
        what = f"{verb} {LEASES}" + (f" {name!r}" if name else "")
        try:
            response = await self._client.request(
                method, path, headers=self._auth_header(), **kwargs
            )
        except httpx.HTTPError as exc:
            raise ClusterError(
                f"Kubernetes API at {self.config.url}: {what} failed: {exc!r}"
            ) from exc
        if response.is_success:
            answer: dict[str, Any] = response.json()
            return answer
        raise _error(response, what, self.config.namespace)


def _error(response: httpx.Response, what: str, namespace: str) -> ClusterError:
    """The ClusterError for an API answer that is not a success."""
    try:
        message = str(response.json().get("message", ""))
    except (ValueError, AttributeError):  # not JSON, or not a Status object
        message = response.text[:200]
    code = response.status_code
    if code == 409:
        return Conflict(f"Kubernetes API: {what}: {message}")
    if code == 404:
        return NotFound(f"Kubernetes API: {what}: {message}")
    if code == 401:
        return ClusterError(
            f"Kubernetes API: {what}: 401 Unauthorized ({message}); check the token in"
            " cluster.k8s_token_file"
        )
    if code == 403:
        return ClusterError(
            f"Kubernetes API: {what} in namespace {namespace!r} is forbidden ({message});"
            f" {RBAC_HINT}"
        )
    return ClusterError(f"Kubernetes API: {what}: {code} {message}")
