"""The CLI against a running server, finding it through the data dir."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import httpx

from tests.integration.server import RunningServer, child_env, iotmesh_command


def cli(server: RunningServer, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        iotmesh_command(*args, "--data-dir", str(server.data_dir)),
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(),
        check=False,
    )


def test_version() -> None:
    result = subprocess.run(
        iotmesh_command("--version"), capture_output=True, text=True, check=True
    )
    assert result.stdout.startswith("iotmesh ")


def test_device_and_telemetry_commands(server: RunningServer) -> None:
    created = cli(server, "device", "create", "pump-7", "--token", "pump-7-token")
    assert created.returncode == 0, created.stderr
    assert "pump-7-token" in created.stdout

    listed = json.loads(cli(server, "device", "list", "--json").stdout)
    assert [d["name"] for d in listed["data"]] == ["pump-7"]
    device_id = listed["data"][0]["id"]
    assert device_id in cli(server, "device", "show", "pump-7").stdout

    with httpx.Client(base_url=server.url) as dev:
        payload = [{"ts": 1_700_000_000_000 + i, "values": {"flow": i}} for i in range(5)]
        assert dev.post("/api/v1/pump-7-token/telemetry", json=payload).status_code == 200

    query = cli(
        server, "telemetry", "query", "pump-7", "--keys", "flow", "--json", "--order", "ASC"
    )
    assert query.returncode == 0, query.stderr
    points: dict[str, Any] = json.loads(query.stdout)
    assert [p["value"] for p in points["flow"]] == [0, 1, 2, 3, 4]
    avg = json.loads(
        cli(
            server, "telemetry", "query", device_id, "--agg", "avg", "--interval", "60000", "--json"
        ).stdout
    )
    assert avg["flow"][0]["value"] == 2.0
    latest = cli(server, "telemetry", "latest", "pump-7")
    assert "flow" in latest.stdout

    dup = cli(server, "device", "create", "pump-7")
    assert dup.returncode == 1
    assert "409" in dup.stderr

    assert cli(server, "device", "delete", "pump-7").returncode == 0
    missing = cli(server, "device", "show", "pump-7")
    assert missing.returncode == 1
    assert "no device named" in missing.stderr


def test_unreachable_server_is_explained(server: RunningServer) -> None:
    result = subprocess.run(
        iotmesh_command("device", "list", "--url", "http://127.0.0.1:9", "--admin-token", "x"),
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(),
        check=False,
    )
    assert result.returncode == 1
    assert "cannot reach iotmesh" in result.stderr
