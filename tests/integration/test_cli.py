"""The CLI against a running server, finding it through the data dir."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import httpx

from tests.integration.server import RunningServer, child_env, iotmesh_command


def cli(
    server: RunningServer, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        iotmesh_command(*args, "--data-dir", str(server.data_dir)),
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(),
        check=False,
        input=stdin,
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


def test_device_credentials_command(server: RunningServer) -> None:
    assert cli(server, "device", "create", "valve-3", "--token", "valve-3-token").returncode == 0
    shown = cli(server, "device", "credentials", "valve-3")
    assert shown.returncode == 0, shown.stderr
    assert "ACCESS_TOKEN" in shown.stdout
    assert "valve-3-token" in shown.stdout

    basic = ["device", "credentials", "valve-3", "--basic", "--client-id", "valve-c"]
    done = cli(server, *basic, "--username", "valve-u", "--password-stdin", stdin="s3cret\n")
    assert done.returncode == 0, done.stderr
    assert "MQTT_BASIC" in done.stdout
    assert "s3cret" not in done.stdout
    listed = json.loads(cli(server, "device", "credentials", "valve-3", "--json").stdout)
    assert listed[1] == {
        "type": "MQTT_BASIC",
        "client_id": "valve-c",
        "username": "valve-u",
        "password_set": True,
    }

    def publish(*login: str) -> int:
        cmd = ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(server.mqtt_port), "-q", "1"]
        cmd += ["-t", "v1/devices/me/telemetry", "-m", '{"open": 1}', *login]
        return subprocess.run(cmd, capture_output=True, timeout=30, check=False).returncode

    assert publish("-i", "valve-c", "-u", "valve-u", "-P", "s3cret") == 0  # no newline kept
    assert publish("-i", "valve-c", "-u", "valve-u", "-P", "s3cret\n") != 0

    assert cli(server, *basic, "--password", "other").returncode == 1  # needs a user name
    assert cli(server, "device", "credentials", "valve-3", "--username", "u").returncode == 2
    cleared = cli(server, "device", "credentials", "valve-3", "--clear-basic")
    assert cleared.returncode == 0, cleared.stderr
    assert "MQTT_BASIC" not in cleared.stdout
    assert publish("-i", "valve-c", "-u", "valve-u", "-P", "s3cret") != 0


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
