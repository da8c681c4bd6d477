"""The Kubernetes cluster backend beyond the shared contract: the Lease objects it
writes, the names it gives them, where it finds the API, and the errors it raises.

Against a FAKE API server (tests/k8s_fake.py), because no Kubernetes cluster can run
on this machine; the contract suite (tests/contract/test_cluster.py) runs the same
fake for the behaviour every engine shares.
"""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from iotmesh.cluster import ClusterError, Instance
from iotmesh.cluster.k8s_api import ApiConfig
from iotmesh.cluster.k8s_backend import KubernetesCluster, label_value, object_name
from iotmesh.core.settings import ClusterSettings
from tests.k8s_fake import DNS_SUBDOMAIN, FakeApiServer


def settings(fake: FakeApiServer, **overrides: Any) -> ClusterSettings:
    values: dict[str, Any] = {
        "backend": "kubernetes",
        "namespace": f"t{uuid.uuid4().hex[:10]}",
        "heartbeat_interval_s": 0.2,
        "ttl_s": 1.0,
        **fake.cluster_settings(),
        **overrides,
    }
    return ClusterSettings(**values)


@pytest.fixture
async def backend(fake_kubernetes: FakeApiServer) -> AsyncIterator[KubernetesCluster]:
    b = KubernetesCluster(settings(fake_kubernetes))
    await b.start()
    try:
        yield b
    finally:
        await b.delete_everything()
        await b.stop()


def stored(fake: FakeApiServer, name: str) -> dict[str, Any]:
    """The Lease as the fake API server holds it."""
    return fake.fake.leases[fake.namespace, name]


def test_object_names_are_dns_subdomains_and_distinct() -> None:
    assert object_name("iotmesh", "lease", "retention") == "iotmesh.lease.retention"
    odd = [object_name("ns", "lease", n) for n in ("Job", "job", "_job", "job-", "J_ob", "j-ob")]
    assert odd[1] == "ns.lease.job"
    assert len(set(odd)) == len(odd)
    long = object_name("ns", "instance", "s" * 100, "i" * 100)
    for name in [*odd, long]:
        assert DNS_SUBDOMAIN.fullmatch(name), name
        assert len(name) <= 253
        assert all(len(part) <= 63 for part in name.split("."))
    assert label_value("T_1-a") == "T_1-a"
    assert label_value("_x") != label_value("x")
    assert len(label_value("x" * 64)) <= 63


async def test_leases_are_kubernetes_leases_whose_token_survives_release(
    backend: KubernetesCluster, fake_kubernetes: FakeApiServer
) -> None:
    name = object_name(backend.settings.namespace, "lease", "job")
    assert await backend.acquire("job", "one", 1.5) == 1
    lease = stored(fake_kubernetes, name)
    assert lease["spec"]["holderIdentity"] == "one"
    assert lease["spec"]["leaseDurationSeconds"] == 2  # whole seconds, rounded up
    assert lease["spec"]["leaseTransitions"] == 0
    assert lease["metadata"]["labels"]["iotmesh.io/role"] == "lease"
    await backend.release("job", "one", 1)
    assert "holderIdentity" not in stored(fake_kubernetes, name)["spec"]  # kept, freed
    assert await backend.acquire("job", "two", 1.5) == 2
    lease = stored(fake_kubernetes, name)
    assert lease["spec"]["leaseTransitions"] == 1
    assert lease["metadata"]["annotations"]["iotmesh.io/fencing-token"] == "2"


async def test_an_instance_is_a_labelled_lease_and_a_long_dead_one_is_deleted(
    backend: KubernetesCluster, fake_kubernetes: FakeApiServer
) -> None:
    instance = Instance(service="api", instance_id="Pod_1", addresses=["http://10.0.0.1:80"])
    await backend.put(instance)
    before = fake_kubernetes.fake.requests
    await backend.put(instance)  # a heartbeat: one replace, at the resourceVersion written
    assert fake_kubernetes.fake.requests == before + 1
    name = object_name(backend.settings.namespace, "instance", "api", "Pod_1")
    lease = stored(fake_kubernetes, name)
    assert lease["spec"]["holderIdentity"] == "api.Pod_1"
    assert lease["metadata"]["labels"]["iotmesh.io/service"] == "api"
    assert (
        '"addresses":["http://10.0.0.1:80"]'
        in lease["metadata"]["annotations"]["iotmesh.io/instance"]
    )
    assert [i.instance_id for i in await backend.list("api")] == ["Pod_1"]

    async def deleted() -> None:
        # Expired after ttl_s: not listed; silent a further ttl_s: listing deletes it.
        while (fake_kubernetes.namespace, name) in fake_kubernetes.fake.leases:
            assert await backend.list("api") == []
            await asyncio.sleep(0.2)

    await asyncio.sleep(1.0)
    await asyncio.wait_for(deleted(), 15)


async def test_a_wrong_token_fails_start_with_401(
    fake_kubernetes: FakeApiServer, tmp_path: Path
) -> None:
    wrong = tmp_path / "token"
    wrong.write_text("not-the-token")
    with pytest.raises(ClusterError, match=r"401 Unauthorized.*k8s_token_file"):
        await KubernetesCluster(settings(fake_kubernetes, k8s_token_file=wrong)).start()
    missing = tmp_path / "absent"
    with pytest.raises(ClusterError, match="cannot read the Kubernetes token"):
        await KubernetesCluster(settings(fake_kubernetes, k8s_token_file=missing)).start()


async def test_rbac_refusal_names_the_verbs_and_resource_needed(
    fake_kubernetes: FakeApiServer,
) -> None:
    b = KubernetesCluster(settings(fake_kubernetes, k8s_namespace="elsewhere"))
    with pytest.raises(ClusterError) as caught:
        await b.start()
    message = str(caught.value)
    assert "forbidden" in message
    assert "'elsewhere'" in message
    assert "get, list, create, update and delete on leases.coordination.k8s.io" in message


async def test_an_unreachable_api_fails_start_naming_it(fake_kubernetes: FakeApiServer) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    url = f"http://127.0.0.1:{port}"
    with pytest.raises(ClusterError, match=f"Kubernetes API at {url}: list"):
        await KubernetesCluster(settings(fake_kubernetes, k8s_api_url=url)).start()


async def test_the_api_answers_another_error_with_its_message(
    backend: KubernetesCluster,
) -> None:
    with pytest.raises(ClusterError, match="422 Lease 'Bad_Name' is invalid"):
        await backend.api.create({"metadata": {"name": "Bad_Name"}, "spec": {}})


def test_in_a_pod_the_api_is_the_kubernetes_service(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    assert ClusterSettings(backend="kubernetes").k8s_api_url == "https://10.96.0.1:443"
    given = ClusterSettings(backend="kubernetes", k8s_api_url="http://127.0.0.1:8001")
    assert given.k8s_api_url == "http://127.0.0.1:8001"
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST")
    with pytest.raises(ClusterError, match="k8s_api_url unset"):
        ApiConfig.from_settings(ClusterSettings(backend="kubernetes"))
