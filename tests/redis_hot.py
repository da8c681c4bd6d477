"""Redis hot state for tests: the local redis-server (scripts/test starts one), database
15, a namespace of its own per test (deleted afterwards), so runs do not meet."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from iotmesh.core.settings import RedisSettings
from iotmesh.storage.redis import HotState

REDIS_URL = "redis://127.0.0.1:6379/15"

HotFactory = Callable[..., Awaitable[HotState]]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def dead_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.fixture
async def redis_hot() -> AsyncIterator[HotFactory]:
    """`await redis_hot(**settings)`: a started HotState; all share the test's namespace."""
    namespace = f"t{uuid.uuid4().hex[:10]}"
    started: list[HotState] = []

    async def make(**overrides: Any) -> HotState:
        if not _listening(6379):
            pytest.fail("redis-server is not listening on 127.0.0.1:6379; scripts/test starts it")
        values: dict[str, Any] = {"url": REDIS_URL, "namespace": namespace, **overrides}
        hot = HotState(RedisSettings(**values))
        await hot.start()
        started.append(hot)
        return hot

    try:
        yield make
    finally:
        for hot in started:
            await hot.stop()
        if started:
            cleaner = HotState(RedisSettings(url=REDIS_URL, namespace=namespace))
            await cleaner.start()
            await cleaner.delete_everything()
            await cleaner.stop()


class RedisOutage:
    """A TCP relay to the local Redis that a test can cut and restore, to play an outage
    without touching the shared server. Runs in the test's event loop."""

    def __init__(self) -> None:
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/15"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        """Close the listener and every relayed connection."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", 6379)
        self._writers.update((writer, up_writer))

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
