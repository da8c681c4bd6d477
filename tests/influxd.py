"""A real `influxd` (InfluxDB 1.x, the Debian package) for tests: started, pinged, stopped.

The server gets a generated config: HTTP on a free loopback port, the RPC (backup)
listener on another, meta/data/wal in a temp dir, reporting, self-monitoring, continuous
queries and every other listener off. Tests share one server per session and each uses
its own database, so they cannot see each other's data.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx

STARTUP_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class InfluxServer:
    """A started influxd process."""

    def __init__(self, port: int, root: Path) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = port
        self.root = root
        self.url = f"http://127.0.0.1:{port}"

    @classmethod
    def start(cls, root: Path, *, auth: bool = False) -> InfluxServer:
        """Start influxd with its files under `root`; return once /ping answers.

        With `auth`, InfluxDB wants credentials (`auth-enabled`); until a first admin
        user is created (`CREATE USER ... WITH ALL PRIVILEGES`), it accepts only that.

        Raises:
            RuntimeError: influxd is not installed, exited, or was not ready in time.
        """
        binary = shutil.which("influxd")
        if binary is None:
            raise RuntimeError("influxd is not installed: scripts/test installs it (influxdb)")
        root.mkdir(parents=True, exist_ok=True)
        port, rpc_port = free_port(), free_port()
        config = root / "influxdb.conf"
        config.write_text(
            f"""reporting-enabled = false
bind-address = "127.0.0.1:{rpc_port}"
[meta]
  dir = "{root / "meta"}"
[data]
  dir = "{root / "data"}"
  wal-dir = "{root / "wal"}"
  query-log-enabled = false
[monitor]
  store-enabled = false
[http]
  bind-address = "127.0.0.1:{port}"
  log-enabled = false
  auth-enabled = {"true" if auth else "false"}
[continuous_queries]
  enabled = false
[logging]
  level = "warn"
"""
        )
        server = cls(port, root)
        server.launch()
        return server

    def launch(self) -> None:
        """Start influxd (again, after `stop`) with the same config, ports and files.

        Raises:
            RuntimeError: influxd exited or was not ready in time (with its log).
        """
        binary = shutil.which("influxd")
        assert binary is not None
        with (self.root / "influxd.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [binary, "-config", str(self.root / "influxdb.conf")],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"influxd exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/ping", timeout=2).status_code == 204:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"influxd was not ready in time:\n{self.output()}")

    def output(self) -> str:
        return (self.root / "influxd.log").read_text(errors="replace")

    def stop(self, timeout: float = 20.0) -> None:
        """Stop influxd by its PID (SIGTERM, then SIGKILL if it hangs)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
