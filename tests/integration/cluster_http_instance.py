"""A tiny HTTP service instance in its own process, registered in the cluster.

    python -m tests.integration.cluster_http_instance '<Settings JSON>' SERVICE INSTANCE_ID

Serves `GET /whoami` (answers its instance id) on 127.0.0.1 (a free port) with the
standard library's HTTP server in a thread, and keeps itself registered with a TTL
heartbeat. Prints `ready <port>`; runs until killed.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from iotmesh.cluster import Registration, make_backend
from iotmesh.core.settings import Settings


def serve(instance_id: str) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = instance_id.encode()
            self.send_response(200 if self.path == "/whoami" else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True, name="http").start()
    return server


async def main(settings_json: str, service: str, instance_id: str) -> None:
    settings = Settings.model_validate_json(settings_json)
    server = serve(instance_id)
    port = server.server_address[1]
    backend = make_backend(settings)
    await backend.start()
    registration = Registration(
        backend,
        service,
        interval_s=settings.cluster.heartbeat_interval_s,
        addresses=[f"http://127.0.0.1:{port}"],
        version="test",
        instance_id=instance_id,
    )
    async with registration:
        print(f"ready {port}", flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
