"""A FAKE Kubernetes API server: only the Lease endpoints the cluster backend calls.

It is a fake because no Kubernetes cluster can run on the development machine (no
container images can be pulled), and the project's rule allows fakes exactly where the
real thing cannot run. What passes against it shows that the backend keeps the cluster
contract given the API semantics written here, as the Kubernetes API documents them;
not that a real API server agrees with this reading.

Served (coordination.k8s.io/v1, any namespace):

    GET    /apis/coordination.k8s.io/v1/namespaces/<ns>/leases?labelSelector=k=v,...
    POST   /apis/coordination.k8s.io/v1/namespaces/<ns>/leases         409 if it exists
    GET    /apis/coordination.k8s.io/v1/namespaces/<ns>/leases/<name>  404 if missing
    PUT    .../leases/<name>   needs metadata.resourceVersion (422), 409 when not current
    DELETE .../leases/<name>   DeleteOptions.preconditions.resourceVersion: 409 if not current

A request without `Authorization: Bearer <token>` gets 401; a namespace outside
`allowed` gets 403 (as RBAC answers). resourceVersions come from one counter, as etcd's
revision; as in Kubernetes, nothing expires: readers judge a Lease by its renewTime.

It runs in a thread with its own event loop (the project's hypercorn `HttpServer` on
127.0.0.1, an ephemeral port), so the test's loop and child processes can all use it.
"""

from __future__ import annotations

import asyncio
import re
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from iotmesh.core.settings import HttpSettings
from iotmesh.transports.http import HttpServer

LEASES = "/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def status(code: int, reason: str, message: str) -> JSONResponse:
    """An error answer in the API's own form (a `Status` object)."""
    body = {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    return JSONResponse(body, status_code=code)


@dataclass
class FakeKubernetes:
    """The fake's state: Leases by (namespace, name), and what it accepts."""

    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    allowed: set[str] = field(default_factory=lambda: {"iotmesh-test"})
    leases: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    revision: int = 0
    requests: int = 0  # answered so far (tests count what an operation costs)

    def app(self) -> Starlette:
        methods = ["GET", "PUT", "DELETE"]
        return Starlette(
            routes=[
                Route(LEASES, self._collection, methods=["GET", "POST"]),
                Route(LEASES + "/{name}", self._one, methods=methods),
            ]
        )

    def _refused(self, request: Request, verb: str) -> JSONResponse | None:
        self.requests += 1
        if request.headers.get("authorization") != f"Bearer {self.token}":
            return status(401, "Unauthorized", "Unauthorized")
        namespace = request.path_params["namespace"]
        if namespace not in self.allowed:
            return status(
                403,
                "Forbidden",
                f'leases.coordination.k8s.io is forbidden: User "system:serviceaccount:'
                f'{namespace}:default" cannot {verb} resource "leases" in API group'
                f' "coordination.k8s.io" in the namespace "{namespace}"',
            )
        return None

    def _stamp(self, lease: dict[str, Any]) -> dict[str, Any]:
        self.revision += 1
        lease["metadata"]["resourceVersion"] = str(self.revision)
        return lease

    async def _collection(self, request: Request) -> JSONResponse:
        verb = "list" if request.method == "GET" else "create"
        refused = self._refused(request, verb)
        if refused is not None:
            return refused
        namespace = request.path_params["namespace"]
        if request.method == "GET":
            wanted = dict(
                term.split("=", 1)
                for term in request.query_params.get("labelSelector", "").split(",")
                if term
            )
            items = [
                lease
                for (ns, _), lease in sorted(self.leases.items())
                if ns == namespace
                and all(lease["metadata"].get("labels", {}).get(k) == v for k, v in wanted.items())
            ]
            body = {
                "kind": "LeaseList",
                "apiVersion": "coordination.k8s.io/v1",
                "metadata": {"resourceVersion": str(self.revision)},
                "items": items,
            }
            return JSONResponse(body)
        lease = await request.json()
        name = lease.get("metadata", {}).get("name", "")
        if not DNS_SUBDOMAIN.fullmatch(name) or len(name) > 253:
            return status(422, "Invalid", f"Lease {name!r} is invalid: metadata.name")
        if (namespace, name) in self.leases:
            return status(
                409, "AlreadyExists", f'leases.coordination.k8s.io "{name}" already exists'
            )
        lease["metadata"].update(namespace=namespace, uid=str(uuid.uuid4()))
        self.leases[namespace, name] = self._stamp(lease)
        return JSONResponse(lease, status_code=201)

    async def _one(self, request: Request) -> JSONResponse:
        verb = {"GET": "get", "PUT": "update", "DELETE": "delete"}[request.method]
        refused = self._refused(request, verb)
        if refused is not None:
            return refused
        key = (request.path_params["namespace"], request.path_params["name"])
        # Read the body first: from the lookup to the write nothing may await, or two
        # requests at one resourceVersion could both pass the compare-and-set.
        body = await request.json() if await request.body() else {}
        current = self.leases.get(key)
        if current is None:
            return status(404, "NotFound", f'leases.coordination.k8s.io "{key[1]}" not found')
        if request.method == "GET":
            return JSONResponse(current)
        conflict = status(
            409,
            "Conflict",
            f'Operation cannot be fulfilled on leases.coordination.k8s.io "{key[1]}": the'
            " object has been modified; please apply your changes to the latest version",
        )
        if request.method == "DELETE":
            wanted = (body.get("preconditions") or {}).get("resourceVersion")
            if wanted is not None and wanted != current["metadata"]["resourceVersion"]:
                return conflict
            del self.leases[key]
            return JSONResponse(current)
        version = body.get("metadata", {}).get("resourceVersion")
        if not version:
            return status(
                422, "Invalid", "metadata.resourceVersion: must be specified for an update"
            )
        if version != current["metadata"]["resourceVersion"]:
            return conflict
        body["metadata"].update(namespace=key[0], uid=current["metadata"]["uid"])
        self.leases[key] = self._stamp(body)
        return JSONResponse(body)


@dataclass
class FakeApiServer:
    """A running fake: where it is, and the settings that point the backend at it."""

    url: str
    fake: FakeKubernetes
    token_file: Path
    namespace: str = "iotmesh-test"

    def cluster_settings(self) -> dict[str, Any]:
        """`ClusterSettings` values for the backend to use this server."""
        return {
            "k8s_api_url": self.url,
            "k8s_namespace": self.namespace,
            "k8s_token_file": self.token_file,
            "k8s_ca_file": None,
        }


@pytest.fixture(scope="session")
def fake_kubernetes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeApiServer]:
    """One fake API server for the session, in its own thread; tests use own namespaces
    (`cluster.namespace`) inside its one Kubernetes namespace."""
    fake = FakeKubernetes()
    token_file = tmp_path_factory.mktemp("k8s") / "token"
    token_file.write_text(fake.token + "\n")
    started: Future[tuple[asyncio.AbstractEventLoop, asyncio.Event, int]] = Future()

    async def serve() -> None:
        # The project's own hypercorn server, on an ephemeral port.
        server = HttpServer(fake.app(), "127.0.0.1", HttpSettings(port=0, server="hypercorn"))
        stop = asyncio.Event()
        async with server:
            started.set_result((asyncio.get_running_loop(), stop, server.port))
            await stop.wait()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), name="fake-kubernetes")
    thread.start()
    loop, stop, port = started.result(timeout=30)
    try:
        yield FakeApiServer(f"http://127.0.0.1:{port}", fake, token_file)
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=30)
