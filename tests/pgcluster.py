"""A private PostgreSQL cluster for a test that must stop and start its server.

`tests/postgres.py` shares the machine's server on :5432 among tests; a test that
stops PostgreSQL must never touch that one. This makes a cluster of its own with
`initdb` in a temp dir under /tmp and runs it with `pg_ctl` on a free loopback port,
its socket in the same dir. As root it runs everything as the `postgres` user
(`runuser -u postgres --`: PostgreSQL refuses to run as root), so the dir is owned by
`postgres`; the test's own tmp_path (0700, root's) would not be reachable.

Resource handling: `stop` and `destroy` go through `pg_ctl stop` on this cluster's data
dir, which signals the postmaster named in its own `postmaster.pid`; `destroy` also
removes the dir.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.influxd import free_port

TIMEOUT_S = 60


def _bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise RuntimeError("initdb not found under /usr/lib/postgresql/*/bin (Debian postgresql)")
    return Path(found[-1]).parent


class PgCluster:
    """An initdb'd cluster in a temp dir, started and stopped on demand."""

    def __init__(self, root: Path, port: int) -> None:
        self.root = root
        self.port = port
        self.data = root / "data"
        self.sockets = root / "sockets"
        self.bindir = _bindir()
        self.as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        self.url = f"postgresql://postgres@127.0.0.1:{port}/postgres"

    @classmethod
    def create(cls) -> PgCluster:
        """initdb a new cluster (trust auth for local and loopback) and start it.

        Raises:
            RuntimeError: PostgreSQL is not installed, or initdb / start failed.
        """
        root = Path(tempfile.mkdtemp(prefix="iotmesh-pgcluster-"))
        cluster = cls(root, free_port())
        cluster.sockets.mkdir()
        if cluster.as_postgres:
            for path in (root, cluster.sockets):
                shutil.chown(path, "postgres", "postgres")
        try:
            cluster._run(
                str(cluster.bindir / "initdb"),
                "-D",
                str(cluster.data),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
            )
            cluster.start()
        except BaseException:
            cluster.destroy()
            raise
        return cluster

    def _run(self, *args: str) -> None:
        proc = subprocess.run(
            [*self.as_postgres, *args], capture_output=True, text=True, timeout=TIMEOUT_S
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")

    def start(self) -> None:
        """Start the server (again) on the same port and data dir; return when it accepts
        connections (`pg_ctl -w`)."""
        options = f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1"
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.root / "server.log"),
            "-o",
            options,
            "-w",
            "-t",
            str(TIMEOUT_S),
            "start",
        )

    def stop(self) -> None:
        """Stop the server now: `-m fast` ends every open connection."""
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def log(self) -> str:
        path = self.root / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def destroy(self) -> None:
        """Stop the server if it runs and remove the cluster's files."""
        try:
            if self.running():
                self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
