"""`iotmesh export`: a device's raw telemetry to CSV or JSON lines, streamed page by page.

The REST query API is read with the admin token, like the other CLI commands, one page
of `--page-size` points per key at a time, ascending from `--from`; each key is its own
stream of pages and the streams are merged by ts (`heapq.merge`, lazily), so memory
holds one page per key whatever the range. A row per point, in ts order (keys in the
order given on a tie):

    csv:    ts,key,value          (strings as they are, true/false, JSON as JSON text)
    jsonl:  {"ts": ..., "key": ..., "value": ...}

The progress bar (stderr) follows the time range covered so far. With `--output`, the
file appears only when the export is complete (it is written as FILE.part, then
renamed); on an error nothing is left behind.
"""

from __future__ import annotations

import csv
import heapq
import json
import os
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal, TextIO

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from iotmesh.cli.client import ApiClient, ClientError
from iotmesh.core.clock import now_ms
from iotmesh.core.errors import ConfigError
from iotmesh.core.settings import load_settings

_MAX_PAGE = 100_000  # the API's largest `limit`
_err = Console(stderr=True)


def parse_time(text: str) -> int:
    """Unix ms, or an ISO 8601 date/time (UTC unless it says otherwise)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(
            f"{text!r} is neither Unix milliseconds nor an ISO 8601 date/time"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def key_points(
    client: ApiClient, device_id: str, key: str, start: int, end: int, page_size: int
) -> Iterator[tuple[int, str, Any]]:
    """The points of one key in [start, end], ascending, one page in memory at a time."""
    path = f"/api/v1/devices/{device_id}/telemetry"
    cursor = start
    while cursor <= end:
        params = {
            "keys": key,
            "start_ts": cursor,
            "end_ts": end,
            "limit": page_size,
            "order": "ASC",
        }
        page = client.request("GET", path, params=params).get(key, [])
        for point in page:
            yield point["ts"], key, point["value"]
        if len(page) < page_size:
            return
        cursor = page[-1]["ts"] + 1  # a key has one point per ts: nothing skipped


def rows(
    client: ApiClient, device_id: str, keys: list[str], start: int, end: int, page_size: int
) -> Iterator[tuple[int, str, Any]]:
    """Every key's points merged by (ts, key order)."""
    order = {k: i for i, k in enumerate(keys)}
    streams = [key_points(client, device_id, k, start, end, page_size) for k in keys]
    return heapq.merge(*streams, key=lambda row: (row[0], order[row[1]]))


class _Writer:
    def __init__(self, out: TextIO, fmt: str) -> None:
        self._out = out
        self._csv = csv.writer(out, lineterminator="\n") if fmt == "csv" else None
        if self._csv is not None:
            self._csv.writerow(["ts", "key", "value"])

    def write(self, ts: int, key: str, value: Any) -> None:
        if self._csv is None:
            self._out.write(json.dumps({"ts": ts, "key": key, "value": value}) + "\n")
            return
        if isinstance(value, bool):
            cell: Any = "true" if value else "false"
        elif isinstance(value, dict | list) or value is None:
            cell = json.dumps(value, separators=(",", ":"))
        else:
            cell = value
        self._csv.writerow([ts, key, cell])


def export(
    device: Annotated[str, typer.Option("--device", help="Device id or name.")],
    keys: Annotated[
        str | None, typer.Option("--keys", help="Comma-separated keys (default: all).")
    ] = None,
    start: Annotated[
        str, typer.Option("--from", help="Start (inclusive): Unix ms or ISO 8601.")
    ] = "0",
    end: Annotated[
        str | None, typer.Option("--to", help="End (inclusive): Unix ms or ISO 8601; now.")
    ] = None,
    fmt: Annotated[Literal["csv", "jsonl"], typer.Option("--format", help="csv or jsonl.")] = "csv",
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="File to write (default: stdout).")
    ] = None,
    page_size: Annotated[
        int, typer.Option(min=1, max=_MAX_PAGE, help="Points per request and key.")
    ] = 10_000,
    url: Annotated[
        str | None, typer.Option("--url", envvar="IOTMESH_URL", help="Server URL.")
    ] = None,
    admin_token: Annotated[
        str | None, typer.Option("--admin-token", envvar="IOTMESH_ADMIN_TOKEN", help="Admin token.")
    ] = None,
    data_dir: Annotated[
        Path | None, typer.Option("--data-dir", help="Data dir to find the server and token in.")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Export a device's raw telemetry as CSV or JSON lines (streamed, constant memory)."""
    start_ms = parse_time(start)
    end_ms = now_ms() if end is None else parse_time(end)
    if start_ms > end_ms:
        raise typer.BadParameter("--from must not be after --to")
    try:
        settings = load_settings(overrides={"data_dir": data_dir})
    except ConfigError as exc:
        _err.print(f"[red]iotmesh: {exc}[/red]")
        raise typer.Exit(2) from None
    client = ApiClient.from_options(url, admin_token, settings.data_dir)
    part = None if output is None else output.with_name(output.name + ".part")
    try:
        device_id = client.device_id(device)
        wanted = [k for k in (keys or "").split(",") if k]
        if not wanted:
            wanted = client.request("GET", f"/api/v1/devices/{device_id}/telemetry/keys")
        out = sys.stdout if part is None else part.open("w", encoding="utf-8", newline="")
        try:
            count = _copy(client, device_id, wanted, start_ms, end_ms, page_size, out, fmt, quiet)
        finally:
            if out is not sys.stdout:
                out.close()
        if part is not None and output is not None:
            os.replace(part, output)
    except ClientError as exc:
        _err.print(f"[red]iotmesh: {exc}[/red]")
        raise typer.Exit(1) from None
    except OSError as exc:
        _err.print(f"[red]iotmesh: cannot write {output}: {exc.strerror}[/red]")
        raise typer.Exit(1) from None
    finally:
        if part is not None and part.exists():
            part.unlink()
    if not quiet:
        where = "stdout" if output is None else str(output)
        _err.print(f"exported {count:,} points of {len(wanted)} keys to {where}")


def _copy(
    client: ApiClient,
    device_id: str,
    keys: list[str],
    start: int,
    end: int,
    page_size: int,
    out: TextIO,
    fmt: str,
    quiet: bool,
) -> int:
    writer = _Writer(out, fmt)
    count = 0
    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TextColumn("{task.fields[points]:,} points"),
        TimeElapsedColumn(),
        console=_err,
        disable=quiet,
        transient=False,
    ) as progress:
        task = progress.add_task("export", total=end - start + 1, points=0)
        for ts, key, value in rows(client, device_id, keys, start, end, page_size):
            writer.write(ts, key, value)
            count += 1
            if count % 1000 == 0:
                progress.update(task, completed=ts - start, points=count)
        progress.update(task, completed=end - start + 1, points=count)
    return count
