"""`iotmesh` command line: run the platform, manage devices, query telemetry."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from iotmesh import __version__
from iotmesh.cli.client import ApiClient, ClientError
from iotmesh.cli.config import config_app
from iotmesh.cli.doctor import doctor
from iotmesh.cli.export import export
from iotmesh.cli.run import run
from iotmesh.cli.serve import serve
from iotmesh.cli.services import services
from iotmesh.core.errors import ConfigError
from iotmesh.core.settings import load_settings

app = typer.Typer(
    help="iotmesh: an IoT platform. Start with `iotmesh run`.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
device_app = typer.Typer(help="Manage devices on a running server.", no_args_is_help=True)
telemetry_app = typer.Typer(help="Read telemetry from a running server.", no_args_is_help=True)
app.add_typer(device_app, name="device")
app.add_typer(telemetry_app, name="telemetry")
app.add_typer(config_app, name="config")
app.command()(run)
app.command()(serve)
app.command()(doctor)
app.command()(services)
app.command()(export)

out = Console()
if not out.is_terminal:
    out = Console(width=200)  # piped output: never cut ids or tokens to 80 columns
err = Console(stderr=True)

UrlOpt = Annotated[
    str | None, typer.Option("--url", envvar="IOTMESH_URL", help="Server URL.", show_default=False)
]
TokenOpt = Annotated[
    str | None,
    typer.Option(
        "--admin-token", envvar="IOTMESH_ADMIN_TOKEN", help="Admin token.", show_default=False
    ),
]
DataDirOpt = Annotated[
    Path | None, typer.Option("--data-dir", help="Data dir to find the server and token in.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _version(value: bool) -> None:
    if value:
        print(f"iotmesh {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """iotmesh: connect devices, store their data, query it."""


def _client(url: str | None, token: str | None, data_dir: Path | None) -> ApiClient:
    try:
        settings = load_settings(overrides={"data_dir": data_dir})
    except ConfigError as exc:
        err.print(f"[red]iotmesh: {exc}[/red]")
        raise typer.Exit(2) from None
    return ApiClient.from_options(url, token, settings.data_dir)


def _call(client: ApiClient, method: str, path: str, **kwargs: Any) -> Any:
    try:
        return client.request(method, path, **kwargs)
    except ClientError as exc:
        err.print(f"[red]iotmesh: {exc}[/red]")
        raise typer.Exit(1) from None


def _device_table(devices: list[dict[str, Any]]) -> Table:
    table = Table("id", "name", "type", "label", "access token")
    for d in devices:
        table.add_row(d["id"], d["name"], d["type"], d.get("label") or "", d["access_token"])
    return table


@device_app.command("create")
def device_create(
    name: str,
    token: Annotated[str | None, typer.Option("--token", "-t", help="Access token to use.")] = None,
    type_: Annotated[str, typer.Option("--type", help="Device type.")] = "default",
    label: Annotated[str | None, typer.Option(help="Free-text label.")] = None,
    url: UrlOpt = None,
    admin_token: TokenOpt = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Register a device and print its id and access token."""
    client = _client(url, admin_token, data_dir)
    body = {"name": name, "type": type_, "label": label, "access_token": token}
    device = _call(client, "POST", "/api/v1/devices", json=body)
    if as_json:
        print(json.dumps(device))
    else:
        out.print(f"id            {device['id']}\naccess token  {device['access_token']}")


@device_app.command("list")
def device_list(
    search: Annotated[str | None, typer.Option(help="Only names containing this.")] = None,
    page: int = 0,
    page_size: int = 100,
    url: UrlOpt = None,
    token: TokenOpt = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List devices."""
    client = _client(url, token, data_dir)
    params: dict[str, Any] = {"page": page, "page_size": page_size}
    if search:
        params["text_search"] = search
    result = _call(client, "GET", "/api/v1/devices", params=params)
    if as_json:
        print(json.dumps(result))
        return
    out.print(_device_table(result["data"]))
    out.print(f"{len(result['data'])} of {result['total']} devices")


@device_app.command("show")
def device_show(
    device: Annotated[str, typer.Argument(help="Device id or name.")],
    url: UrlOpt = None,
    token: TokenOpt = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show one device."""
    client = _client(url, token, data_dir)
    found = _call(client, "GET", f"/api/v1/devices/{_resolve(client, device)}")
    if as_json:
        print(json.dumps(found))
        return
    for field in ("id", "name", "type", "label", "created_ts", "access_token"):
        out.print(f"{field:<13} {found.get(field) or ''}", highlight=False)


@device_app.command("delete")
def device_delete(
    device: Annotated[str, typer.Argument(help="Device id or name.")],
    url: UrlOpt = None,
    token: TokenOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Delete a device with its token and telemetry."""
    client = _client(url, token, data_dir)
    device_id = _resolve(client, device)
    _call(client, "DELETE", f"/api/v1/devices/{device_id}")
    out.print(f"deleted {device_id}")


@device_app.command("rotate-token")
def device_rotate(
    device: Annotated[str, typer.Argument(help="Device id or name.")],
    new_token: Annotated[str | None, typer.Option("--new-token", help="Token to set.")] = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Give a device a new access token (the old one stops working)."""
    client = _client(url, token, data_dir)
    body = {"access_token": new_token}
    found = _call(
        client, "POST", f"/api/v1/devices/{_resolve(client, device)}/credentials", json=body
    )
    out.print(f"access token  {found['access_token']}")


@device_app.command("credentials")
def device_credentials(
    device: Annotated[str, typer.Argument(help="Device id or name.")],
    basic: Annotated[
        bool, typer.Option("--basic", help="Set MQTT Basic credentials (replacing any).")
    ] = False,
    client_id: Annotated[
        str | None, typer.Option("--client-id", help="MQTT Basic: the client id.")
    ] = None,
    username: Annotated[
        str | None, typer.Option("--username", help="MQTT Basic: the user name.")
    ] = None,
    password: Annotated[
        str | None,
        typer.Option("--password", help="MQTT Basic: the password (see --password-stdin)."),
    ] = None,
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from standard input.")
    ] = False,
    clear_basic: Annotated[
        bool, typer.Option("--clear-basic", help="Remove the MQTT Basic credentials.")
    ] = False,
    url: UrlOpt = None,
    token: TokenOpt = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show a device's credentials, or set or remove its MQTT Basic credentials.

    MQTT Basic credentials are a client id, a user name, or both, with an optional
    password (which needs a user name). A password on the command line shows in the
    process list; --password-stdin reads it from standard input instead.
    """
    given = (client_id, username, password) != (None, None, None) or password_stdin
    if given and not basic:
        _usage("--client-id, --username and --password go with --basic")
    if basic and clear_basic:
        _usage("--basic and --clear-basic exclude each other")
    if password is not None and password_stdin:
        _usage("give --password or --password-stdin, not both")
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    client = _client(url, token, data_dir)
    path = f"/api/v1/devices/{_resolve(client, device)}/credentials"
    if basic:
        body = {"type": "MQTT_BASIC", "client_id": client_id, "username": username}
        if password is not None:
            body["password"] = password
        _call(client, "PUT", path, json=body)
    elif clear_basic:
        _call(client, "DELETE", f"{path}/MQTT_BASIC")
    entries = _call(client, "GET", path)
    if as_json:
        print(json.dumps(entries))
        return
    for entry in entries:
        fields = [f"{k}={'' if v is None else v}" for k, v in entry.items() if k != "type"]
        out.print(f"{entry['type']:<17} {' '.join(fields)}", highlight=False)


def _usage(message: str) -> NoReturn:
    err.print(f"[red]iotmesh: {message}[/red]")
    raise typer.Exit(2)


def _resolve(client: ApiClient, ref: str) -> str:
    try:
        return client.device_id(ref)
    except ClientError as exc:
        err.print(f"[red]iotmesh: {exc}[/red]")
        raise typer.Exit(1) from None


@telemetry_app.command("query")
def telemetry_query(
    device: Annotated[str, typer.Argument(help="Device id or name.")],
    keys: Annotated[str | None, typer.Option(help="Comma-separated keys (default: all).")] = None,
    start_ts: Annotated[int, typer.Option("--start", help="Start, Unix ms.")] = 0,
    end_ts: Annotated[int | None, typer.Option("--end", help="End, Unix ms (now).")] = None,
    agg: Annotated[str, typer.Option(help="NONE, AVG, MIN, MAX, SUM or COUNT.")] = "NONE",
    interval_ms: Annotated[int, typer.Option("--interval", help="Bucket width in ms.")] = 0,
    limit: int = 100,
    order: Annotated[str, typer.Option(help="ASC or DESC.")] = "DESC",
    url: UrlOpt = None,
    token: TokenOpt = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Query a device's telemetry, raw or aggregated."""
    client = _client(url, token, data_dir)
    params: dict[str, Any] = {
        "start_ts": start_ts,
        "agg": agg.upper(),
        "interval_ms": interval_ms,
        "limit": limit,
        "order": order.upper(),
    }
    if keys:
        params["keys"] = keys
    if end_ts is not None:
        params["end_ts"] = end_ts
    result = _call(
        client, "GET", f"/api/v1/devices/{_resolve(client, device)}/telemetry", params=params
    )
    _print_points(result, as_json)


@telemetry_app.command("latest")
def telemetry_latest(
    device: Annotated[str, typer.Argument(help="Device id or name.")],
    keys: Annotated[str | None, typer.Option(help="Comma-separated keys (default: all).")] = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show the newest value of each key."""
    client = _client(url, token, data_dir)
    params = {"keys": keys} if keys else {}
    path = f"/api/v1/devices/{_resolve(client, device)}/telemetry/latest"
    _print_points(_call(client, "GET", path, params=params), as_json)


@app.command("stats")
def stats(
    url: UrlOpt = None,
    token: TokenOpt = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show the counters of each service of a running server (connections, messages,
    commits, queue depths)."""
    result = _call(_client(url, token, data_dir), "GET", "/api/v1/stats")
    if as_json:
        print(json.dumps(result))
        return
    table = Table("service", "counter", "value")
    for service, counters in result.items():
        for name, value in counters.items():
            table.add_row(service, name, json.dumps(value))
    out.print(table)


def _print_points(result: dict[str, list[dict[str, Any]]], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
        return
    table = Table("key", "ts", "value")
    for key, points in result.items():
        for point in points:
            table.add_row(key, str(point["ts"]), json.dumps(point["value"]))
    out.print(table)


@app.command("asyncapi")
def asyncapi(
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write to this file, not stdout.")
    ] = None,
) -> None:
    """Print the AsyncAPI 3.0 document of the device MQTT topics and the bus (JSON)."""
    from iotmesh.asyncapi import render  # imports the transports: only when asked

    text = render()
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text, encoding="utf-8")


def main() -> None:
    """Entry point of the `iotmesh` console script."""
    app()
