"""`GET /api/v1/stats` and `iotmesh stats`: the services' counters, seen from outside."""

from __future__ import annotations

import json
from typing import Any

import httpx

from tests.integration.mqtt_helpers import V311, PahoClient, device_client
from tests.integration.server import RunningServer
from tests.integration.test_cli import cli

TELEMETRY = "v1/devices/me/telemetry"


def test_stats_count_messages_commits_and_auth_failures(
    server: RunningServer, admin: httpx.Client, device: dict[str, Any]
) -> None:
    with device_client(server.mqtt_port, device["access_token"]) as client:
        for i in range(3):
            client.publish(TELEMETRY, json.dumps({"t": i}), qos=1)
    with PahoClient(server.mqtt_port, "not-a-token", version=V311) as stranger:
        assert stranger.connect().value == 0x87  # paho reports v3.1.1 code 5 as v5 0x87

    stats = admin.get("/api/v1/stats").json()

    mqtt = stats["mqtt"]
    assert mqtt["messages_in"][1] == 3  # by QoS
    assert mqtt["auth_failures"] == 1
    assert mqtt["connections_total"] == 2
    assert mqtt["telemetry_batches"] >= 1
    writer = stats["writer"]
    assert writer["records"] == 3
    assert writer["commits"] >= 1
    assert writer["pending_records"] == 0
    assert stats["bus"] == {"queued": 0}
    assert stats["pipeline"] == {"dropped": 0}


def test_stats_need_the_admin_token(server: RunningServer) -> None:
    with server.anonymous() as anonymous:
        r = anonymous.get("/api/v1/stats")
    assert r.status_code == 401
    assert r.headers["content-type"] == "application/problem+json"


def test_cli_prints_the_stats(server: RunningServer) -> None:
    done = cli(server, "stats", "--json")
    assert done.returncode == 0, done.stderr
    assert set(json.loads(done.stdout)) >= {"mqtt", "writer", "bus", "pipeline"}
    table = cli(server, "stats")
    assert "auth_failures" in table.stdout
