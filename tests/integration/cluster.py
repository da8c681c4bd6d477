"""Start `iotmesh serve SERVICE` processes sharing one data dir and bus, for tests and
bench/scaleout.py; and a QoS 1 publisher that records exactly what was PUBACKed.

Each process runs as a subprocess on ephemeral ports; its run-info file
`instances/<service>-<id>.json` says where it listens, as it does for the CLI.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from iotmesh.cluster import make_backend
from iotmesh.core.settings import Settings
from tests.integration.mqtt_helpers import connect_packet, publish_packet
from tests.integration.server import child_env, iotmesh_command

STARTUP_TIMEOUT_S = 40.0
NATS_URL = "nats://127.0.0.1:4222"
REDIS_URL = "redis://127.0.0.1:6379/15"  # the test db, as the bus contract suite uses


def bus_env(backend: str, **extra: str) -> dict[str, str]:
    """The settings (as IOTMESH_* variables) of a fresh platform on `backend`; its
    processes register in a fresh cluster namespace on the same engine."""
    namespace = f"t{uuid.uuid4().hex[:10]}"
    return {
        "IOTMESH_BUS__BACKEND": backend,
        "IOTMESH_BUS__NAMESPACE": namespace,
        "IOTMESH_BUS__NATS_URL": NATS_URL,
        "IOTMESH_BUS__REDIS_URL": REDIS_URL,
        "IOTMESH_CLUSTER__NAMESPACE": namespace,
        **extra,
    }


def cluster_settings(env: Mapping[str, str]) -> Settings:
    """The settings `iotmesh serve` processes started with `env` register with."""
    cluster: dict[str, Any] = {"namespace": env["IOTMESH_CLUSTER__NAMESPACE"]}
    if "IOTMESH_CLUSTER__TTL_S" in env:
        cluster["ttl_s"] = float(env["IOTMESH_CLUSTER__TTL_S"])
    return Settings(
        bus={  # type: ignore[arg-type]
            "backend": env["IOTMESH_BUS__BACKEND"],
            "namespace": env["IOTMESH_BUS__NAMESPACE"],
            "nats_url": NATS_URL,
            "redis_url": REDIS_URL,
        },
        cluster=cluster,  # type: ignore[arg-type]
    )


def services(env: Mapping[str, str]) -> list[dict[str, Any]]:
    """`iotmesh services --json` with the platform's settings: the live instances."""
    done = subprocess.run(
        iotmesh_command("services", "--json"),
        env=child_env(env),
        capture_output=True,
        timeout=60,
        check=True,
    )
    rows: list[dict[str, Any]] = json.loads(done.stdout)
    return rows


async def delete_bus_data(env: Mapping[str, str]) -> None:
    """Delete every stream, consumer and key of the platform's namespace, and its
    cluster registry."""
    from iotmesh.bus import make_bus
    from iotmesh.core.settings import BusSettings

    settings = BusSettings(
        backend=env["IOTMESH_BUS__BACKEND"],  # type: ignore[arg-type]
        namespace=env["IOTMESH_BUS__NAMESPACE"],
        nats_url=NATS_URL,
        redis_url=REDIS_URL,
    )
    cleaner: Any = make_bus(settings)
    await cleaner.start()
    try:
        await cleaner.delete_everything()
    finally:
        await cleaner.stop()
    registry = make_backend(cluster_settings(env))
    await registry.start()
    try:
        await registry.delete_everything()
    finally:
        await registry.stop()


@dataclass
class Instance:
    """One started `iotmesh serve` process."""

    role: str
    instance_id: str
    proc: subprocess.Popen[bytes]
    log_dir: Path
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def mqtt_port(self) -> int:
        return int(self.info["mqtt"]["port"])

    @property
    def coap_port(self) -> int:
        return int(self.info["coap"]["port"])

    @property
    def url(self) -> str:
        return str(self.info["http"]["url"])

    def output(self) -> str:
        return (self.log_dir / "stdout").read_text() + (self.log_dir / "stderr").read_text()

    def kill9(self) -> None:
        """Crash the process: SIGKILL, no chance to flush or settle anything."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def launch(
    role: str, instance_id: str, data_dir: Path, log_root: Path, env: Mapping[str, str]
) -> Instance:
    """Start `iotmesh serve ROLE` (ready: see `wait_ready`)."""
    log_dir = log_root / f"{role}-{instance_id}"
    log_dir.mkdir(parents=True, exist_ok=True)
    cmd = iotmesh_command(
        "serve",
        role,
        "--data-dir",
        str(data_dir),
        "--instance-id",
        instance_id,
        "--http-port",
        "0",
        "--mqtt-port",
        "0",
        "--coap-port",
        "0",
    )
    with (log_dir / "stdout").open("wb") as out, (log_dir / "stderr").open("wb") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=child_env(env), cwd=log_dir)
    return Instance(role, instance_id, proc, log_dir)


def wait_ready(instance: Instance, data_dir: Path) -> Instance:
    """Return once the instance's run-info file is written and its /healthz says 200.

    Raises:
        RuntimeError: it exited or was not ready in time (with its output).
    """
    run_file = data_dir / "instances" / f"{instance.role}-{instance.instance_id}.json"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if instance.proc.poll() is not None:
            raise RuntimeError(f"{instance.role} exited:\n{instance.output()}")
        with contextlib.suppress(OSError, ValueError):
            info = json.loads(run_file.read_text())
            if info.get("pid") == instance.pid:
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(info["health"]["url"] + "/healthz", timeout=2).is_success:
                        instance.info = info
                        return instance
        time.sleep(0.05)
    instance.proc.kill()
    instance.proc.wait()
    raise RuntimeError(f"{instance.role} was not ready in time:\n{instance.output()}")


def start(
    roles: list[tuple[str, str]], data_dir: Path, log_root: Path, env: Mapping[str, str]
) -> list[Instance]:
    """Start several instances at once and wait until all are ready."""
    started = [launch(role, iid, data_dir, log_root, env) for role, iid in roles]
    try:
        return [wait_ready(instance, data_dir) for instance in started]
    except BaseException:
        for instance in started:
            instance.stop()
        raise


# -- a QoS 1 publisher ----------------------------------------------------------------

T0 = 1_700_000_000_000


def message(n: int) -> bytes:
    """Message n of a device: messages 2k and 2k+1 share ts T0 + k, so the store's `seq`
    at that ts shows which was written last (per-device order); `v0`/`v1` keep both."""
    return json.dumps({"ts": T0 + n // 2, "values": {"seq": n, f"v{n % 2}": n}}).encode()


@dataclass
class DeviceLoad:
    """What one device sent and got PUBACKed, over all its connections."""

    token: str
    ports: list[int]
    sent: int = 0
    acked: set[int] = field(default_factory=set)
    reconnects: int = 0
    breaks: list[str] = field(default_factory=list)


async def publish(
    load: DeviceLoad,
    max_messages: int,
    window: int,
    stop: asyncio.Event,
    interval_s: float = 0.0,
) -> None:
    """Publish `max_messages` QoS 1 messages with `window` unacknowledged at most, and
    at least `interval_s` apart (0: as fast as the acks allow).

    When its transport's connection breaks (the server was killed), the device notes
    what was acknowledged and connects to the next port in `load.ports`; messages in
    flight then are neither resent nor counted as acknowledged.
    """
    port_index = 0
    while load.sent < max_messages and not stop.is_set():
        if port_index >= len(load.ports):
            return
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", load.ports[port_index])
        except OSError:
            port_index += 1
            continue
        try:
            await _session(reader, writer, load, max_messages, window, stop, interval_s)
        except (OSError, asyncio.IncompleteReadError, EOFError) as exc:
            port_index += 1
            load.reconnects += 1
            load.breaks.append(f"{load.ports[port_index - 1]}: {exc!r}"[:80])
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def _session(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    load: DeviceLoad,
    max_messages: int,
    window: int,
    stop: asyncio.Event,
    interval_s: float,
) -> None:
    writer.write(connect_packet(f"c-{uuid.uuid4().hex[:8]}", username=load.token))
    head = await reader.readexactly(4)
    if head[0] != 0x20 or head[3] != 0:
        raise EOFError(f"CONNACK refused: {head!r}")
    in_flight: dict[int, int] = {}  # packet id -> n
    room = asyncio.Semaphore(window)
    drained = asyncio.Event()  # set when nothing is in flight
    drained.set()

    async def read_acks() -> None:
        try:
            while True:
                kind, _, pid_hi, pid_lo = await reader.readexactly(4)
                if kind != 0x40:
                    raise EOFError(f"unexpected packet {kind:#x}")
                n = in_flight.pop(pid_hi << 8 | pid_lo)
                load.acked.add(n)
                room.release()
                if not in_flight:
                    drained.set()
        finally:  # the connection ended: wake the sender, which then sees it
            for _ in range(window + 1):
                room.release()

    acks = asyncio.create_task(read_acks(), name="pubacks")
    try:
        while load.sent < max_messages and not stop.is_set():
            async with asyncio.timeout(30):
                await room.acquire()
            if acks.done():
                acks.result()  # raises what ended the connection
                raise EOFError("connection closed")
            n = load.sent
            packet_id = n % 60_000 + 1
            in_flight[packet_id] = n
            drained.clear()
            load.sent += 1
            writer.write(
                publish_packet("v1/devices/me/telemetry", message(n), qos=1, packet_id=packet_id)
            )
            await writer.drain()
            if interval_s:
                await asyncio.sleep(interval_s)
        waiter = asyncio.create_task(drained.wait(), name="drained")
        try:
            async with asyncio.timeout(30):  # the acks still owed
                await asyncio.wait([acks, waiter], return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if acks.done():
            acks.result()
        writer.write(b"\xe0\x00")  # DISCONNECT
        await writer.drain()
    finally:
        acks.cancel()
        with contextlib.suppress(
            asyncio.CancelledError, OSError, EOFError, asyncio.IncompleteReadError
        ):
            await acks


def create_devices(admin: httpx.Client, count: int, prefix: str) -> list[dict[str, Any]]:
    devices = []
    for i in range(count):
        r = admin.post("/api/v1/devices", json={"name": f"{prefix}-{i}"})
        assert r.status_code == 201, r.text
        devices.append(r.json())
    return devices


def admin_client(data_dir: Path, url: str) -> httpx.Client:
    token = (data_dir / "admin_token").read_text().strip()
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30)
