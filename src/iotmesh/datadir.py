"""The data directory: checked, locked for one process, holding secrets and run info.

Layout:
    state.db        devices and credentials (SQLite)
    timeseries.db   telemetry (SQLite, chunked)
    mqtt-sessions.sqlite  persistent MQTT sessions, their queued messages, retained messages
    admin_token     the REST API's bearer token when not given in settings (mode 0600)
    run.json        where the running process listens (read by the CLI and tests)
    lock            held (flock) by the process using the directory
    instances/      `iotmesh serve`: one process per service instance shares the
                    directory; each has `<service>-<id>.json` (its run info), a
                    `.lock` it holds, and a folder of its own files (MQTT sessions)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
from pathlib import Path
from typing import IO, Any

from iotmesh.core.errors import StartupError

ADMIN_TOKEN_FILE = "admin_token"
RUN_FILE = "run.json"
LOCK_FILE = "lock"
INSTANCES_DIR = "instances"


class DataDir:
    """Owns the data directory while the process runs.

    With `instance` (`iotmesh serve`: `<service>-<id>`), the process locks and publishes
    only its own files under `instances/`, so that the services of one platform can
    share the directory (SQLite WAL lets several processes use one file).
    """

    def __init__(self, path: Path, instance: str | None = None) -> None:
        self.path = path.expanduser().absolute()
        self._lock: IO[str] | None = None
        if instance is None:
            self.own_dir = self.path
            self._lock_file = self.path / LOCK_FILE
            self.run_file = self.path / RUN_FILE
        else:
            self.own_dir = self.path / INSTANCES_DIR / instance
            self._lock_file = self.path / INSTANCES_DIR / f"{instance}.lock"
            self.run_file = self.path / INSTANCES_DIR / f"{instance}.json"

    def acquire(self) -> None:
        """Create the directory if needed, check it is writable, and lock it.

        Raises:
            StartupError: not creatable, not writable, or used by another process.
        """
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self.own_dir.mkdir(parents=True, exist_ok=True)
            probe = self.path / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise StartupError(
                f"data dir {self.path} is not writable: {exc.strerror or exc}"
            ) from exc
        lock = self._lock_file.open("a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            lock.close()
            what = "data dir" if self.own_dir == self.path else f"instance {self.own_dir.name} of"
            raise StartupError(
                f"{what} {self.path} is in use by another iotmesh process (pid {holder})"
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
        self._lock = lock

    def release(self) -> None:
        """Remove run info and unlock."""
        with contextlib.suppress(FileNotFoundError):
            self.run_file.unlink()
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def admin_token(self) -> tuple[str, bool]:
        """The stored admin token, generating it on first use.

        Returns:
            The token, and whether it was generated now (so the caller prints it once).
        """
        path = self.path / ADMIN_TOKEN_FILE
        if path.is_file():
            return path.read_text().strip(), False
        token = secrets.token_urlsafe(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(token + "\n")
        return token, True

    def write_run_info(self, info: dict[str, Any]) -> None:
        """Publish where this process listens (atomically: write then rename)."""
        tmp = self.run_file.with_name(f"{self.run_file.name}.tmp")
        tmp.write_text(json.dumps(info, indent=2) + "\n")
        tmp.replace(self.run_file)


def read_run_info(data_dir: Path) -> dict[str, Any] | None:
    """The run info of the process using `data_dir`, or None when none is running."""
    try:
        info: dict[str, Any] = json.loads((data_dir.expanduser() / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None
    return info


def read_instances(data_dir: Path) -> list[dict[str, Any]]:
    """The run info of every `iotmesh serve` instance that published one in `data_dir`
    (a killed process leaves its file behind: check its pid or health URL)."""
    found = []
    for path in sorted((data_dir.expanduser() / INSTANCES_DIR).glob("*.json")):
        try:
            found.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return found


def read_admin_token(data_dir: Path) -> str | None:
    """The admin token stored in `data_dir`, or None."""
    try:
        return (data_dir.expanduser() / ADMIN_TOKEN_FILE).read_text().strip() or None
    except OSError:
        return None
