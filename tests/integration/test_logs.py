"""`iotmesh run --log-format json`: every stderr line is a JSON object with the fields."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path
from typing import Any

from tests.integration.mqtt_helpers import V5, device_client
from tests.integration.server import child_env, iotmesh_command, start_server


def test_json_logs_of_a_running_server(data_dir: Path, tmp_path: Path) -> None:
    srv = start_server(data_dir, tmp_path / "logs", "--log-format", "json")
    try:
        instance = json.loads((data_dir / "run.json").read_text())["instance_id"]
        with srv.admin() as admin:
            dev = admin.post("/api/v1/devices", json={"name": "logged"}).json()
        with device_client(srv.mqtt_port, dev["access_token"], version=V5) as client:
            # Refused (0x99) and logged at INFO by the device API.
            assert client.publish("v1/devices/me/telemetry", b"{not json").value == 0x99
    finally:
        assert srv.stop() == 0
    records: list[dict[str, Any]] = [
        json.loads(line) for line in (tmp_path / "logs" / "stderr").read_text().splitlines()
    ]
    assert records
    for record in records:
        assert {"ts", "level", "logger", "message", "service", "instance"} <= set(record)
        assert record["service"] == "iotmesh"
        assert record["instance"] == instance
    refused = [r for r in records if "refused" in r["message"]]
    assert refused
    assert refused[0]["logger"] == "iotmesh.transports.mqtt.device_api"
    assert refused[0]["level"] == "INFO"


def test_a_start_up_failure_is_one_json_line_too(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        args = ("--data-dir", str(tmp_path / "d"), "--http-port", str(port))
        result = subprocess.run(
            iotmesh_command("run", "--mqtt-port", "0", "--log-format", "json", *args),
            capture_output=True,
            text=True,
            timeout=60,
            env=child_env(),
            cwd=tmp_path,
            check=False,
        )
    assert result.returncode == 2, result.stderr
    [line] = [json.loads(text) for text in result.stderr.splitlines() if text.strip()]
    assert line["level"] == "ERROR"
    assert line["message"].startswith("cannot start: ")
    assert f"http port {port}" in line["message"]
