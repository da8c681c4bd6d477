"""The data directory: checked, locked for one process, holding secrets and run info.

Layout:
    state.db        devices and credentials (SQLite)
    timeseries.db   telemetry (SQLite, chunked)
    mqtt-sessions.sqlite  persistent MQTT sessions, their queued messages, retained messages
    admin_token     the REST API's bearer token when not given in settings (mode 0600)
    run.json        where the running process listens (read by the CLI and tests)
    lock            held (flock) by the process using the directory
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


class DataDir:
    """Owns the data directory while the process runs."""

    def __init__(self, path: Path) -> None:
        self.path = path.expanduser().absolute()
        self._lock: IO[str] | None = None

    def acquire(self) -> None:
        """Create the directory if needed, check it is writable, and lock it.

        Raises:
            StartupError: not creatable, not writable, or used by another process.
        """
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise StartupError(
                f"data dir {self.path} is not writable: {exc.strerror or exc}"
            ) from exc
        lock = (self.path / LOCK_FILE).open("a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            lock.close()
            raise StartupError(
                f"data dir {self.path} is in use by another iotmesh process (pid {holder})"
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
        self._lock = lock

    def release(self) -> None:
        """Remove run info and unlock."""
        with contextlib.suppress(FileNotFoundError):
            (self.path / RUN_FILE).unlink()
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
        tmp = self.path / f"{RUN_FILE}.tmp"
        tmp.write_text(json.dumps(info, indent=2) + "\n")
        tmp.replace(self.path / RUN_FILE)


def read_run_info(data_dir: Path) -> dict[str, Any] | None:
    """The run info of the process using `data_dir`, or None when none is running."""
    try:
        info: dict[str, Any] = json.loads((data_dir.expanduser() / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None
    return info


def read_admin_token(data_dir: Path) -> str | None:
    """The admin token stored in `data_dir`, or None."""
    try:
        return (data_dir.expanduser() / ADMIN_TOKEN_FILE).read_text().strip() or None
    except OSError:
        return None
