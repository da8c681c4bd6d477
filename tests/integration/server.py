"""Start and stop a real `iotmesh run` process for integration tests.

The server runs as a subprocess on ephemeral ports (`--http-port 0`) with its own data
dir; tests find its port in the data dir's run.json, exactly as the CLI does.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

STARTUP_TIMEOUT_S = 30.0


class RunningServer:
    """A started `iotmesh run` subprocess."""

    def __init__(self, proc: subprocess.Popen[bytes], data_dir: Path, log_dir: Path) -> None:
        self.proc = proc
        self.data_dir = data_dir
        self.log_dir = log_dir
        info = json.loads((data_dir / "run.json").read_text())
        self.url: str = info["http"]["url"]
        self.tls_url: str | None = info["http"].get("tls_url")
        self.mqtt_port: int = info["mqtt"]["port"]
        self.mqtt_tls_port: int | None = info["mqtt"].get("tls_port")
        self.coap_port: int | None = info.get("coap", {}).get("port")
        self.admin_token = (data_dir / "admin_token").read_text().strip()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def admin(self, **kwargs: Any) -> httpx.Client:
        """An httpx client with the admin bearer token."""
        headers = {"Authorization": f"Bearer {self.admin_token}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30, **kwargs)

    def anonymous(self, **kwargs: Any) -> httpx.Client:
        """An httpx client without credentials (devices use their token in the URL)."""
        return httpx.Client(base_url=self.url, timeout=30, **kwargs)

    def output(self) -> str:
        return (self.log_dir / "stdout").read_text() + (self.log_dir / "stderr").read_text()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Send `sig` to the server and wait for it to exit; return its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def kill9(self) -> None:
        """Crash the server: SIGKILL, no chance to flush anything."""
        self.stop(signal.SIGKILL)


def iotmesh_command(*args: str) -> list[str]:
    """The command line of `iotmesh ARGS` with this interpreter."""
    return [sys.executable, "-m", "iotmesh", *args]


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a child iotmesh: no IOTMESH_* leaking in from the caller."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IOTMESH_")}
    env.update(extra or {})
    return env


def start_server(
    data_dir: Path,
    log_dir: Path,
    *args: str,
    env: Mapping[str, str] | None = None,
) -> RunningServer:
    """Start `iotmesh run` and return once /healthz answers 200.

    Raises:
        RuntimeError: the process exited or was not ready in time (with its output).
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "run.json").unlink(missing_ok=True)
    cmd = iotmesh_command(
        "run",
        "--data-dir",
        str(data_dir),
        "--http-port",
        "0",
        "--mqtt-port",
        "0",
        "--coap-port",
        "0",
        *args,
    )
    with (log_dir / "stdout").open("wb") as out, (log_dir / "stderr").open("wb") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=child_env(env), cwd=log_dir)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"iotmesh run exited with {proc.returncode}:\n" + (log_dir / "stderr").read_text()
            )
        run_file = data_dir / "run.json"
        if run_file.exists():
            try:
                info = json.loads(run_file.read_text())
            except ValueError:
                info = {}
            if info.get("pid") == proc.pid:
                try:
                    r = httpx.get(info["http"]["url"] + "/healthz", timeout=2)
                except httpx.TransportError:
                    r = None
                if r is not None and r.status_code == 200:
                    return RunningServer(proc, data_dir, log_dir)
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise RuntimeError("iotmesh run was not ready in time:\n" + (log_dir / "stderr").read_text())
