"""What a process of services shares, whichever services it runs: `iotmesh run`
(`app.Platform`, all of them) and `iotmesh serve ROLE` (`serve.ServedProcess`, one role).

Resource handling: entering takes the data dir's lock and starts the services (a
subclass's `_start`, through its `Builder`, which enters each into the exit stack);
a failed start stops whatever had started. Leaving marks the process as stopping
(`/readyz` says so) and stops the services in reverse order within
`shutdown_timeout_s`, then releases the lock.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
from types import TracebackType
from typing import TYPE_CHECKING, Self

if TYPE_CHECKING:
    from iotmesh.core.settings import Settings
    from iotmesh.datadir import DataDir
    from iotmesh.wiring import Builder


class ServiceProcess(abc.ABC):
    """Base of `Platform` and `ServedProcess`; subclasses set the attributes below in
    their `__init__` and start their services in `_start`."""

    settings: Settings
    data_dir: DataDir
    admin_token: str
    admin_token_generated: bool
    _stack: contextlib.AsyncExitStack
    _builder: Builder

    @abc.abstractmethod
    async def _start(self) -> None:
        """Build and start the services (into `_stack`)."""

    def _admin_token(self) -> str:
        """The admin token: from the settings, else the data dir's (made on first use)."""
        if self.settings.admin_token is not None:
            self.admin_token = self.settings.admin_token.get_secret_value()
        else:
            self.admin_token, self.admin_token_generated = self.data_dir.admin_token()
        return self.admin_token

    async def __aenter__(self) -> Self:
        self.data_dir.acquire()
        self._stack.callback(self.data_dir.release)
        try:
            await self._start()
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._builder.stopping = True  # /readyz says so while the services stop
        async with asyncio.timeout(self.settings.shutdown_timeout_s):
            await self._stack.aclose()
