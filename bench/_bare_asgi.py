"""The reference for bench/http_ingest.py: an ASGI app that reads the body and answers
200, served by iotmesh's own HTTP server class (the same server software and settings
as `iotmesh run`, `--server granian|hypercorn`) in a process of its own.

Run by the benchmark: `python bench/_bare_asgi.py --server granian --port-file F`; it
writes its port to F and serves until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

from iotmesh.core.settings import HttpSettings
from iotmesh.transports.http import HttpServer
from iotmesh.transports.http_granian import GranianHttpServer

Message = MutableMapping[str, Any]


async def app(
    scope: Message,
    receive: Callable[[], Awaitable[Message]],
    send: Callable[[Message], Awaitable[None]],
) -> None:
    if scope["type"] == "lifespan":  # hypercorn runs the lifespan protocol
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False) and message["type"] == "http.request"
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"0")]}
    )
    await send({"type": "http.response.body", "body": b""})


async def serve(server_kind: str, port_file: Path) -> None:
    settings = HttpSettings(port=0, server=server_kind)  # type: ignore[arg-type]
    server_class = GranianHttpServer if server_kind == "granian" else HttpServer
    server = server_class(app, "127.0.0.1", settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    async with server:
        port_file.write_text(str(server.port))  # noqa: ASYNC240 (once, at start-up)
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", choices=["granian", "hypercorn"], default="granian")
    parser.add_argument("--port-file", type=Path, required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.server, args.port_file))


if __name__ == "__main__":
    main()
