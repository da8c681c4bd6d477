"""One SQLite connection, used only from one thread of its own: what the state store
and the MQTT session store share (their statements are short and run in order)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import sqlite3
from collections.abc import Callable
from typing import TypeVar

from iotmesh.core.errors import IotmeshError, StorageError

T = TypeVar("T")


class DbThread:
    """Runs functions on the connection's thread; SQLite errors become `StorageError`
    (or what `translate` makes of them first, e.g. a `Conflict` for a unique key).

    Resource handling: `open` then `close`; `close` waits for the running function.
    """

    def __init__(
        self,
        label: str,
        *,
        translate: Callable[[sqlite3.Error], IotmeshError | None] = lambda exc: None,
    ) -> None:
        self._label = label
        self._translate = translate
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None

    async def open(self, connect: Callable[[], sqlite3.Connection]) -> None:
        """Open the connection with `connect`, on the thread."""
        self._executor = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix=self._label.replace(" ", "-")
        )

        def opened() -> None:
            self._conn = connect()

        try:
            await self.run(opened)
        except BaseException:
            self._executor.shutdown(wait=True)
            self._executor = None
            raise

    async def close(self) -> None:
        if self._executor is None:
            return
        if self._conn is not None:
            await self.run(self._conn.close)
            self._conn = None
        self._executor.shutdown(wait=True)
        self._executor = None

    async def run(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the connection's thread and return its result."""
        if self._executor is None:
            raise StorageError(f"{self._label} is not open")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn)
        except sqlite3.Error as exc:
            raise (self._translate(exc) or StorageError(f"{self._label}: {exc}")) from exc

    @property
    def conn(self) -> sqlite3.Connection:
        """The connection (only from inside a function given to `run`)."""
        assert self._conn is not None, f"{self._label} is not open"
        return self._conn
