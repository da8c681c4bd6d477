"""The SQLite writer in a process of its own (`writer_client.py` is the parent's side).

Why a process. The writer's work (building batch rows, SQLite calls) used to run on a
thread of the server process, and shared the GIL with the event loop that parses MQTT
and HTTP. Every SQLite call releases the GIL and takes it back; while the event loop is
busy, taking it back waits up to the interpreter's switch interval (5 ms). Measured
here: a commit of 1000 records took ~4.5 ms alone and ~30 ms beside a busy event loop,
and end-to-end latency at half load was ~200 ms of such waits. In its own process the
writer has its own GIL and runs on the second core, in parallel with the event loop.

This module is what the child imports, so it stays free of asyncio (its import, with
ssl, is ~6 MB of the child's RSS); the parent's `WriterClient` lives in writer_client.py.

Protocol (`WriterClient` ↔ `serve`, over the child's stdin/stdout): frames of a 4-byte
little-endian length and a MessagePack array. Requests are `[op, *args]`; replies are
`["ok", result]`, `["payload", message]` (the data cannot be stored: `PayloadError`) or
`["storage", message]` (`StorageError`). One request at a time, in order: the client is
used from the store's single writer thread.

Compaction steps run in the child between requests, and only when no request is
waiting: a write never queues behind more than one step (`writes._STEP_BUDGET_S`).

Resource handling: the child exits when its stdin closes, so it never outlives the
server, even after `kill -9` (a write in progress commits or rolls back first, as any
SQLite transaction does). It ignores SIGINT and SIGTERM: Ctrl-C in a terminal (or a
service manager) signals the whole process group, and the server then stops the writer
itself, after the last flush.

Error handling: if the child dies, the call in progress fails with `StorageError` (the
batch writer retries it) and the next call starts a new child.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import select
import signal
import sqlite3
import struct
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from iotmesh.core.errors import PayloadError, StorageError
from iotmesh.core.logs import JsonFormatter
from iotmesh.storage.rollup import RetentionPolicy
from iotmesh.storage.sqlite import schema
from iotmesh.storage.sqlite.writes import SeriesWriter
from iotmesh.storage.timeseries import SeriesWrite

log = logging.getLogger(__name__)

HEADER = struct.Struct("<I")
_CHECKPOINT_EVERY_S = 1.0
MODULE = "iotmesh.storage.sqlite.writer_process"  # what the child runs (`python -m`)

ENCODER = msgspec.msgpack.Encoder()
DECODER = msgspec.msgpack.Decoder(list[Any])
_batch = msgspec.msgpack.Decoder(list[SeriesWrite])


class FileOptions(msgspec.Struct, frozen=True):
    """The settings the writer process needs, sent to it as JSON when it opens."""

    synchronous: str
    chunk_max_points: int
    compact_min_chunks: int
    rollup_levels: list[int] = []


def connect(path: Path, synchronous: str) -> sqlite3.Connection:
    """A connection to the time-series file with the store's pragmas."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        conn.execute("PRAGMA busy_timeout = 10000")
        conn.execute(f"PRAGMA synchronous = {synchronous}")
        conn.execute("PRAGMA cache_size = -65536")  # KiB: 64 MiB of page cache
        conn.execute("PRAGMA mmap_size = 268435456")  # reads map the file: no copy
    except BaseException:
        conn.close()
        raise
    return conn


# -- framing ---------------------------------------------------------------------------


def _write_frame(fd: int, message: Any) -> None:
    body = ENCODER.encode(message)
    data = memoryview(HEADER.pack(len(body)) + body)
    while data:
        data = data[os.write(fd, data) :]


def _read_exact(fd: int, size: int) -> bytes | None:
    parts = []
    while size:
        chunk = os.read(fd, min(size, 1 << 20))
        if not chunk:
            return None
        parts.append(chunk)
        size -= len(chunk)
    return b"".join(parts)


def _read_frame(fd: int) -> list[Any] | None:
    """The next frame, or None at end of file."""
    header = _read_exact(fd, HEADER.size)
    if header is None:
        return None
    body = _read_exact(fd, HEADER.unpack(header)[0])
    return None if body is None else DECODER.decode(body)


# -- the child's side ------------------------------------------------------------------


class _Child:
    """The writer process: the write connection, compaction, WAL checkpoints."""

    def __init__(self, path: str, settings: FileOptions) -> None:
        self._path = Path(path)
        self._settings = settings
        self._steps: deque[Callable[[], None]] = deque()
        self._checkpoints = concurrent.futures.ThreadPoolExecutor(1, "tsdb-checkpoint")
        self._checkpoint_conn: sqlite3.Connection | None = None
        self._checkpoint_queued = False
        self._checkpoint_due = 0.0
        self._path.parent.mkdir(parents=True, exist_ok=True)
        conn = connect(self._path, settings.synchronous)
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            # Checkpoints (copying WAL pages back into the db file) run on their own
            # thread (`_checkpoint`), not in the writer's commits; the writer does one
            # itself only if the WAL grows past 256 MiB (checkpoints falling behind).
            conn.execute("PRAGMA wal_autocheckpoint = 65536")
            # Compaction deletes every batch row it has copied into chunks. Debian's
            # SQLite zeroes deleted content by default (SECURE_DELETE), which writes
            # each freed page again; FAST zeroes only what costs no extra I/O.
            conn.execute("PRAGMA secure_delete = FAST")
            schema.migrate(conn)
            self.writer = SeriesWriter(
                conn, settings, self._steps.append, self._committed, settings.rollup_levels
            )
        except BaseException:
            conn.close()
            raise

    def handle(self, op: str, args: list[Any]) -> Any:
        writer = self.writer
        if op == "write":
            writer.write(_batch.decode(args[0]))
            return None
        if op == "delete":
            return writer.delete(*args)
        if op == "delete_entity":
            writer.delete_entity(*args)
            return None
        if op == "compact":
            return writer.compact_all()
        if op == "retention":
            writer.start_retention(msgspec.msgpack.decode(args[0], type=RetentionPolicy))
            return None
        raise ValueError(f"unknown writer operation {op!r}")

    def run_steps(self, request_waiting: Callable[[], bool]) -> None:
        """Run queued compaction steps while no request waits (a step that is under way
        stops at its next transaction when one comes: `SeriesWriter.interrupted`, which
        `serve` sets once)."""
        while self._steps and not request_waiting():
            self._steps.popleft()()

    def close(self) -> None:
        self.writer.close()
        self._checkpoints.shutdown(wait=True)
        if self._checkpoint_conn is not None:
            self._checkpoint_conn.close()

    def _committed(self) -> None:
        """After a commit: queue a WAL checkpoint if one is due.

        At most one per `_CHECKPOINT_EVERY_S`: pages that many commits rewrite (latest
        values, index pages) are then copied once per interval, not once per commit.
        """
        now = time.monotonic()
        if not self._checkpoint_queued and now >= self._checkpoint_due:
            self._checkpoint_queued = True
            self._checkpoint_due = now + _CHECKPOINT_EVERY_S
            self._checkpoints.submit(self._checkpoint)

    def _checkpoint(self) -> None:
        """Copy committed WAL pages into the db file, beside the writer (PASSIVE)."""
        self._checkpoint_queued = False
        try:
            if self._checkpoint_conn is None:
                self._checkpoint_conn = connect(self._path, self._settings.synchronous)
            self._checkpoint_conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error as exc:  # the next commit queues another try
            log.warning("time-series WAL checkpoint failed: %s", exc)
        except Exception:  # nobody awaits this job: log, or the error would vanish
            log.exception("time-series WAL checkpoint failed")


def _reply(fd: int, work: Callable[..., Any], *args: Any) -> None:
    """Run `work(*args)` and send its outcome."""
    try:
        result = work(*args)
    except PayloadError as exc:
        _write_frame(fd, ["payload", str(exc)])
    except (sqlite3.Error, StorageError, OSError) as exc:
        _write_frame(fd, ["storage", str(exc)])
    except Exception as exc:  # a bug: report it to the caller rather than die silently
        log.exception("time-series writer process: %r failed", work)
        _write_frame(fd, ["storage", f"internal error: {exc!r}"])
    else:
        _write_frame(fd, ["ok", result])


def serve(requests: int, replies: int) -> None:
    """Answer requests until end of file (see the module docstring).

    The first request is `["open", path, settings_json, log_level, json_logs]`, where
    `json_logs` is None (text) or the parent's [service, instance] for JSON lines."""
    frame = _read_frame(requests)
    if frame is None or frame[0] != "open":
        return
    path, settings, level, json_logs = frame[1:]
    logging.getLogger("iotmesh").setLevel(level)
    if json_logs is not None:
        service, instance = json_logs
        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonFormatter(service, instance))
    opened: list[_Child] = []

    def open_file() -> None:
        opened.append(_Child(path, msgspec.json.decode(settings, type=FileOptions)))

    _reply(replies, open_file)
    if not opened:
        return
    child = opened[0]

    def waiting() -> bool:
        return bool(select.select([requests], [], [], 0)[0])

    child.writer.interrupted = waiting

    try:
        while True:
            child.run_steps(waiting)
            frame = _read_frame(requests)
            if frame is None:
                return
            op, args = frame[0], frame[1:]
            _reply(replies, child.handle, op, args)
    finally:
        child.close()


def main() -> None:
    """Entry point of the child (`python -m iotmesh.storage.sqlite.writer_process`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(
        stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s (writer): %(message)s"
    )
    # The protocol owns stdout; anything printed by accident goes to stderr instead.
    replies = os.dup(1)
    os.dup2(2, 1)
    serve(0, replies)


if __name__ == "__main__":
    main()
