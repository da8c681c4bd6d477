"""`iotmesh serve SERVICE`: one service of the platform in this process (distributed mode)."""

from __future__ import annotations

import asyncio
import gc
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from iotmesh import __version__
from iotmesh.cli.run import GC_YOUNG
from iotmesh.core.errors import IotmeshError
from iotmesh.core.ids import SERVICE_NAME
from iotmesh.core.logs import configure_logging
from iotmesh.core.settings import Settings, load_settings


async def _serve(settings: Settings, service: str) -> None:
    # Imported here so that client commands (`iotmesh device ...`) start fast.
    from iotmesh.serve import ServedProcess

    process = ServedProcess(settings, service)
    async with process:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, process.shutdown)
        gc.freeze()  # as `iotmesh run` does: see there
        gc.set_threshold(GC_YOUNG, 10, 10)
        info = process.run_info()
        print(
            f"iotmesh {__version__} serving {service} as {process.instance_id}"
            f" (pid {info['pid']}, bus {settings.bus.backend}, namespace {settings.bus.namespace})",
            flush=True,
        )
        for name, address in sorted((process.info.addresses if process.info else {}).items()):
            print(f"  {name:<8} {address}")
        print(f"  run info {process.data_dir.run_file}")
        if process.admin_token_generated:
            print(f"  admin token (shown once) {process.admin_token}")
        print("Press Ctrl+C to stop.", flush=True)
        await process.wait_closed()
        print(f"iotmesh {service}: stopping…", flush=True)
    print(f"iotmesh {service}: stopped", flush=True)


def serve(
    service: Annotated[
        str, typer.Argument(help="mqtt, coap, http, pipeline, writer or state.", show_default=False)
    ],
    data_dir: Annotated[
        Path | None, typer.Option(help="Data directory the services share (SQLite files).")
    ] = None,
    config: Annotated[Path | None, typer.Option(help="TOML settings file.")] = None,
    host: Annotated[str | None, typer.Option(help="Address to listen on.")] = None,
    http_port: Annotated[
        int | None, typer.Option(help="http: REST + device HTTP port (0 = any free).")
    ] = None,
    mqtt_port: Annotated[int | None, typer.Option(help="mqtt: MQTT port (0 = any free).")] = None,
    coap_port: Annotated[
        int | None, typer.Option(help="coap: CoAP UDP port (0 = any free).")
    ] = None,
    health_port: Annotated[
        int | None, typer.Option(help="Others: /healthz port (0 = any free).")
    ] = None,
    instance_id: Annotated[
        str | None, typer.Option(help="Instance name (default: <host>-<pid>).")
    ] = None,
    bus: Annotated[str | None, typer.Option(help="Bus engine: nats or redis.")] = None,
    namespace: Annotated[
        str | None, typer.Option(help="Prefix of the bus's streams and keys.")
    ] = None,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning or error.")] = None,
) -> None:
    """Run one service of the platform; several processes share one bus and data dir.

    Start `state` first (it creates the state schema), then `writer`, `pipeline`
    workers, and the transports `mqtt`, `coap` and `http`. Each process registers in
    the cluster registry (`iotmesh services` lists them). The bus must be NATS JetStream or
    Redis Streams (`--bus`, or `bus.backend` in settings). docs/operations.md has the
    commands.
    """
    try:
        settings = load_settings(
            config,
            {
                "data_dir": data_dir,
                "host": host,
                "http.port": http_port,
                "mqtt.port": mqtt_port,
                "coap.port": coap_port,
                "serve.health_port": health_port,
                "serve.instance_id": instance_id,
                "bus.backend": bus,
                "bus.namespace": namespace,
                "log_level": log_level,
            },
        )
        # JSON lines name the role: `iotmesh-pipeline`, as the registry and spans do.
        configure_logging(settings.log_level, settings.log_format, f"{SERVICE_NAME}-{service}")
        asyncio.run(_serve(settings, service))
    except IotmeshError as exc:
        print(f"iotmesh: cannot serve {service}: {exc}", file=sys.stderr)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
