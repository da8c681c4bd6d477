"""The parent's side of the SQLite writer process: start it, call it, stop it.

See writer_process.py for why the writer is a process, its protocol and its error
handling; this module holds the client, which runs on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from iotmesh.core.errors import PayloadError, StorageError
from iotmesh.core.logs import json_log_identity
from iotmesh.storage.sqlite.writer_process import DECODER, ENCODER, HEADER, MODULE, FileOptions

if TYPE_CHECKING:
    from iotmesh.core.settings import SqliteSettings

log = logging.getLogger(__name__)

_STOP_TIMEOUT_S = 30.0


class WriterClient:
    """Starts the writer process and calls it, from the event loop (no thread: a reply
    is read when epoll reports it, so no GIL hand-off sits between commit and ack)."""

    def __init__(
        self, path: Path, settings: SqliteSettings, rollup_levels: Sequence[int] = ()
    ) -> None:
        self._path = path
        self._settings = settings
        self._rollup_levels = rollup_levels
        self._proc: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()  # one request at a time, in call order

    async def start(self) -> None:
        """Start the child and wait until it has opened (and migrated) the database."""
        async with self._lock:
            await self._start()

    async def _start(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            MODULE,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        level = logging.getLogger("iotmesh").getEffectiveLevel()
        s = self._settings
        options = FileOptions(
            s.synchronous, s.chunk_max_points, s.compact_min_chunks, list(self._rollup_levels)
        )
        settings = msgspec.json.encode(options).decode()
        json_logs = json_log_identity()  # the child logs as the parent does
        try:
            await self._request(["open", str(self._path), settings, level, json_logs])
        except BaseException:
            await self._stop(kill=True)
            raise

    async def call(self, op: str, *args: Any) -> Any:
        """Run `op` in the child and return its result.

        Raises:
            PayloadError: the child refused the data.
            StorageError: SQLite failed, or the child died (the next call restarts it).
        """
        async with self._lock:
            if self._proc is None:
                await self._start()
            return await self._request([op, *args])

    async def _request(self, message: list[Any]) -> Any:
        proc = self._proc
        assert proc is not None
        assert proc.stdin is not None
        assert proc.stdout is not None
        body = ENCODER.encode(message)
        try:
            proc.stdin.write(HEADER.pack(len(body)) + body)
            await proc.stdin.drain()
            (size,) = HEADER.unpack(await proc.stdout.readexactly(HEADER.size))
            status, result = DECODER.decode(await proc.stdout.readexactly(size))
        except (OSError, asyncio.IncompleteReadError) as exc:
            log.warning("time-series writer process: %r", exc)
            code = await self._stop(kill=True)
            raise StorageError(f"the time-series writer process exited (code {code})") from None
        if status == "ok":
            return result
        if status == "payload":
            raise PayloadError(result)
        raise StorageError(f"time-series store: {result}")

    async def close(self) -> None:
        """Let the child finish and exit (it sees end of file), then reap it."""
        async with self._lock:
            await self._stop(kill=False)

    async def _stop(self, *, kill: bool) -> int | None:
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        if kill and proc.returncode is None:
            proc.kill()
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            async with asyncio.timeout(_STOP_TIMEOUT_S):
                return await proc.wait()
        except TimeoutError:
            log.error("time-series writer process did not exit; killing it")
            proc.kill()
            return await proc.wait()
