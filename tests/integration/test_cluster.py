"""Several real processes on one cluster engine (Redis, NATS KV, Kubernetes), on loopback.

Kubernetes is a FAKE API server (tests/k8s_fake.py, in this test process, reached by
the children over TCP): no Kubernetes cluster can run on this machine.

- leader election: two candidate processes, the leader is `kill -9`ed, the other
  takes over within the lease bound, and a write with the dead leader's fencing token
  is refused;
- discovery: two tiny HTTP instances, one `kill -9`ed: calls fail over at once, the
  detector drops it within its bound (before the registry's TTL), and it disappears
  from `iotmesh services`.

The bounds are correctness bounds with generous slack for a loaded 2-core machine,
not measurements.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from iotmesh.cluster import ClusterBackend, Discovery, StaleToken, make_backend
from iotmesh.cluster.http import ServiceHttp
from iotmesh.core.settings import Settings
from tests.contract.cluster_backends import ENGINES, cluster_settings, engine_settings

ROOT = Path(__file__).resolve().parents[2]
SLACK_S = 5.0  # scheduling on a busy 2-core machine; the bound itself is far smaller


async def until(predicate: Callable[[], bool], within: float = 30.0) -> None:
    """Poll `predicate` (state of other processes, or of a polling client)."""
    async with asyncio.timeout(within):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


async def refused(port: int, within: float = 30.0) -> None:
    """Wait until nothing accepts connections on 127.0.0.1:`port`."""
    async with asyncio.timeout(within):
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except ConnectionRefusedError:
                return
            except ConnectionResetError:  # the listener died during this handshake
                await asyncio.sleep(0.02)
                continue
            writer.close()
            with contextlib.suppress(ConnectionResetError):
                await writer.wait_closed()
            await asyncio.sleep(0.02)


@dataclass
class Child:
    """A child process whose stdout lines are collected as they come."""

    proc: asyncio.subprocess.Process
    lines: list[str] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    reader: asyncio.Task[None] | None = None

    async def wait_for(self, prefix: str, within: float = 30.0) -> str:
        async with asyncio.timeout(within):
            while True:
                for line in self.lines:
                    if line.startswith(prefix):
                        return line
                self.changed.clear()
                await self.changed.wait()

    def kill(self) -> None:
        if self.proc.returncode is None:
            os.kill(self.proc.pid, signal.SIGKILL)

    async def reap(self, within: float = 30.0) -> None:
        """Kill the process and wait for it and its stdout reader, within a bound.

        On Python 3.11 `Process.wait()` returns only once the stdout pipe is closed
        too, so a bound here names the step instead of the test's global timeout.
        """
        self.kill()
        try:
            async with asyncio.timeout(within):
                await self.proc.wait()
                if self.reader is not None:
                    await self.reader
        except TimeoutError:
            raise AssertionError(
                f"child {self.proc.pid} not reaped within {within} s "
                f"(returncode {self.proc.returncode}, last lines {self.lines[-3:]})"
            ) from None


async def spawn(module: str, *args: str) -> Child:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        module,
        *args,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        stdout=asyncio.subprocess.PIPE,
    )
    child = Child(proc)

    async def read() -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            child.lines.append(raw.decode().strip())
            child.changed.set()

    child.reader = asyncio.create_task(read())
    return child


@pytest.fixture
async def children() -> AsyncIterator[list[Child]]:
    made: list[Child] = []
    yield made
    for child in made:
        await child.reap()


@pytest.fixture(params=ENGINES)
async def cluster(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Settings, ClusterBackend]]:
    settings = cluster_settings(
        request.param,
        **engine_settings(request, request.param),
        heartbeat_interval_s=0.2,
        ttl_s=30.0,
        lease_s=2.0,
        acceptable_pause_s=0.2,
    )
    backend = make_backend(settings)
    await backend.start()
    try:
        yield settings, backend
    finally:
        await backend.delete_everything()
        await backend.stop()


async def test_the_leader_is_killed_the_other_takes_over_and_stale_writes_are_refused(
    cluster: tuple[Settings, ClusterBackend], children: list[Child]
) -> None:
    settings, backend = cluster
    lease = settings.cluster.lease_s
    for owner in ("one", "two"):
        child = await spawn(
            "tests.integration.cluster_candidate", settings.model_dump_json(), "retention", owner
        )
        children.append(child)
    for child in children:
        await child.wait_for("ready")
    await until(lambda: any(x.startswith("wrote") for c in children for x in c.lines))
    leader = next(c for c in children if any(x.startswith("wrote") for x in c.lines))
    other = next(c for c in children if c is not leader)
    old_token = int((await leader.wait_for("leader")).split()[1])
    assert not any(x.startswith("leader") for x in other.lines)  # one leader at a time

    leader.kill()
    killed = time.monotonic()
    new_token = int((await other.wait_for("leader", within=lease * 4 + SLACK_S)).split()[1])
    took = time.monotonic() - killed
    assert took <= lease + lease / 3 + SLACK_S  # the bound of election.py, with slack
    assert new_token > old_token
    await other.wait_for("wrote")
    assert await backend.read("retention-output") == (
        new_token,
        b"two" if other is children[1] else b"one",
    )

    # The dead leader's job, had it been merely paused, would now be refused.
    with pytest.raises(StaleToken):
        await backend.write("retention-output", old_token, b"stale")
    holder = await backend.holder("retention")
    assert holder is not None
    assert holder[1] == new_token


def run_services(settings: Settings, *args: str) -> list[dict[str, Any]]:
    c = settings.cluster
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src"),
        "IOTMESH_CLUSTER__BACKEND": c.backend,
        "IOTMESH_CLUSTER__NAMESPACE": c.namespace,
        "IOTMESH_BUS__REDIS_URL": settings.bus.redis_url,
        "IOTMESH_BUS__NATS_URL": settings.bus.nats_url,
        "IOTMESH_CLUSTER__HEARTBEAT_INTERVAL_S": str(c.heartbeat_interval_s),
        "IOTMESH_CLUSTER__TTL_S": str(c.ttl_s),
        "IOTMESH_CLUSTER__ACCEPTABLE_PAUSE_S": str(c.acceptable_pause_s),
    }
    if c.backend == "kubernetes":  # the fake API server (no CA: it speaks plain HTTP)
        env["IOTMESH_CLUSTER__K8S_API_URL"] = str(c.k8s_api_url)
        env["IOTMESH_CLUSTER__K8S_NAMESPACE"] = str(c.k8s_namespace)
        env["IOTMESH_CLUSTER__K8S_TOKEN_FILE"] = str(c.k8s_token_file)
        env["IOTMESH_CLUSTER__K8S_CA_FILE"] = ""
    done = subprocess.run(
        [sys.executable, "-m", "iotmesh", "services", "--json", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    rows: list[dict[str, Any]] = json.loads(done.stdout)
    return rows


async def test_calls_fail_over_and_a_killed_instance_leaves_discovery_and_services(
    cluster: tuple[Settings, ClusterBackend], children: list[Child]
) -> None:
    settings, backend = cluster
    for iid in ("alpha", "beta"):
        child = await spawn(
            "tests.integration.cluster_http_instance", settings.model_dump_json(), "echo", iid
        )
        children.append(child)
        await child.wait_for("ready")
    alpha = children[0]
    discovery = Discovery(backend, "echo", settings.cluster, policy="round_robin")
    async with discovery, httpx.AsyncClient(timeout=5) as client:
        http = ServiceHttp(discovery, client)
        await until(lambda: len(discovery.alive()) == 2)
        answers = {(await http.get("/whoami")).text for _ in range(6)}
        assert answers == {"alpha", "beta"}
        listed = await asyncio.to_thread(run_services, settings)
        assert sorted(r["instance"] for r in listed) == ["alpha", "beta"]
        assert all(r["alive"] and r["addresses"] for r in listed)

        alpha.kill()
        killed = time.monotonic()
        # Its port refuses connections once the kernel has closed its sockets; that
        # is what the calls below need (not the asyncio bookkeeping of its exit).
        await refused(int((await alpha.wait_for("ready")).split()[1]))
        # Right away, before anything noticed: every call still succeeds, on beta.
        for _ in range(10):
            response = await http.get("/whoami")
            assert response.status_code == 200
            assert response.text == "beta"

        # The failed calls may have opened alpha's breaker already; the failure
        # detector (silence alone) must drop it too, within its bound.
        def suspected() -> bool:
            return not {v.instance.instance_id: v for v in discovery.members()}["alpha"].alive

        await until(suspected, within=60)
        dropped = time.monotonic() - killed
        assert "echo.alpha" not in {i.key for i in discovery.alive()}
        c = settings.cluster
        # interval + acceptable pause + z(8) * std (the std of 0.2 s beats that the
        # detector measured, at least phi_min_std_dev_s) + two polling periods.
        bound = c.heartbeat_interval_s + c.acceptable_pause_s + 2 * discovery.poll_s
        bound += 5.62 * max(c.phi_min_std_dev_s, 0.2)
        assert dropped <= bound + SLACK_S
        # Still in the registry (its TTL is 30 s): failure detection came first.
        assert "alpha" in [i.instance_id for i in await backend.list("echo")]

        async def failed_in_services() -> None:
            while True:
                rows = await asyncio.to_thread(run_services, settings)
                if [r["instance"] for r in rows] == ["beta"]:
                    return
                await asyncio.sleep(0.2)

        await asyncio.wait_for(failed_in_services(), bound + SLACK_S + 10)
        everything = await asyncio.to_thread(run_services, settings, "--all")
        dead = next(r for r in everything if r["instance"] == "alpha")
        assert not dead["alive"]
        assert dead["state"] == "failed"
        assert dead["phi"] >= settings.cluster.phi_threshold


def test_services_prints_a_table_and_fails_clearly_without_an_engine(tmp_path: Path) -> None:

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nothing listens there
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    table = subprocess.run(
        [sys.executable, "-m", "iotmesh", "services", "--namespace", f"empty{port}"],
        env={**env, "IOTMESH_BUS__REDIS_URL": "redis://127.0.0.1:6379/15"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert table.returncode == 0, table.stderr
    assert "service" in table.stdout
    assert "0 instances (redis" in table.stdout
    down = subprocess.run(
        [sys.executable, "-m", "iotmesh", "services", "--backend", "redis"],
        env={**env, "IOTMESH_CLUSTER__REDIS_URL": f"redis://127.0.0.1:{port}/0"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert down.returncode == 1
    assert "cannot connect to Redis" in down.stderr
