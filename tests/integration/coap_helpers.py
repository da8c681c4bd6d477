"""Driving the CoAP device API with clients we did not write: libcoap's
`coap-client-notls` (a subprocess, always bounded by a timeout) and aiocoap's client."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import aiocoap
import pytest
from aiocoap import Context, Message
from aiocoap.numbers.codes import Code

from tests.integration.server import RunningServer

COAP_CLIENT = "coap-client-notls"
requires_libcoap = pytest.mark.skipif(
    shutil.which(COAP_CLIENT) is None,
    reason="coap-client-notls missing (Debian libcoap3-bin; scripts/test installs it)",
)

# libcoap prints an error answer as "4.01 diagnostic text" on stderr.
_CODE_LINE = re.compile(r"^([245]\.\d\d)\b", re.MULTILINE)


def coap_url(server: RunningServer, token: str, path: str) -> str:
    return f"coap://127.0.0.1:{server.coap_port}/api/v1/{token}/{path}"


class LibcoapResult:
    """What one coap-client run printed: the payload(s) and the error code, if any."""

    def __init__(self, proc: subprocess.CompletedProcess[bytes]) -> None:
        self.returncode = proc.returncode
        self.stdout = proc.stdout.decode("utf-8", "replace")
        self.stderr = proc.stderr.decode("utf-8", "replace")
        match = _CODE_LINE.search(self.stderr)
        self.error_code = match.group(1) if match else None


def libcoap(*args: str, client: str = COAP_CLIENT, timeout: float = 20.0) -> LibcoapResult:
    """Run libcoap's `client` (coap-client-notls) with `args`; at most `timeout` s."""
    proc = subprocess.run([client, *args], capture_output=True, timeout=timeout, check=False)
    return LibcoapResult(proc)


@asynccontextmanager
async def aiocoap_client() -> AsyncIterator[Context]:
    """An aiocoap client context, shut down on the way out."""
    context = await Context.create_client_context()
    try:
        yield context
    finally:
        await context.shutdown()


async def request(
    context: Context,
    server: RunningServer,
    token: str,
    path: str,
    *,
    code: Code = Code.POST,
    payload: bytes = b"",
    query: Sequence[str] = (),
    reliable: bool = True,
    timeout: float = 20.0,
    **options: Any,
) -> Message:
    """One request to `api/v1/{token}/{path}`; its (reassembled) response."""
    message = Message(
        code=code,
        transport_tuning=aiocoap.Reliable if reliable else aiocoap.Unreliable,
        payload=payload,
        uri=coap_url(server, token, path),
        **options,
    )
    if query:
        message.opt.uri_query = tuple(query)
    async with asyncio.timeout(timeout):
        response: Message = await context.request(message).response
    return response
