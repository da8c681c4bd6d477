"""`iotmesh export` against a running server: every point, in order, in both formats."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import httpx

from tests.integration.server import RunningServer
from tests.integration.test_cli import cli

T0 = 1_700_000_000_000


def _load(server: RunningServer) -> None:
    created = cli(server, "device", "create", "meter-1", "--token", "meter-1-token")
    assert created.returncode == 0, created.stderr
    payload = [{"ts": T0 + i * 1000, "values": {"power": i * 0.5, "count": i}} for i in range(1200)]
    payload += [{"ts": T0 + 500, "values": {"state": "on", "ok": True, "cfg": {"a": [1]}}}]
    with httpx.Client(base_url=server.url) as dev:
        for lo in range(0, len(payload), 300):
            r = dev.post("/api/v1/meter-1-token/telemetry", json=payload[lo : lo + 300])
            assert r.status_code == 200, r.text


def test_export_csv_and_jsonl(server: RunningServer, tmp_path: Path) -> None:
    _load(server)
    out = tmp_path / "meter.csv"
    args = ("--device", "meter-1", "--from", str(T0), "--to", str(T0 + 2_000_000))
    done = cli(server, "export", *args, "--format", "csv", "-o", str(out), "--page-size", "100")
    assert done.returncode == 0, done.stderr
    assert "exported 2,403 points of 5 keys" in done.stderr
    assert not out.with_name("meter.csv.part").exists()
    table = list(csv.reader(io.StringIO(out.read_text())))
    assert table[0] == ["ts", "key", "value"]
    body = table[1:]
    assert len(body) == 2403
    assert [int(r[0]) for r in body] == sorted(int(r[0]) for r in body)
    assert body[0] == [str(T0), "count", "0"]  # keys are sorted by name (all keys)
    assert [str(T0 + 500), "cfg", '{"a":[1]}'] in body
    assert [str(T0 + 500), "ok", "true"] in body
    assert [str(T0 + 500), "state", "on"] in body
    assert body[-1] == [str(T0 + 1199 * 1000), "power", "599.5"]

    lines = cli(
        server,
        "export",
        *args,
        "--keys",
        "power,count",
        "--format",
        "jsonl",
        "--page-size",
        "7",
        "--quiet",
        "--to",
        str(T0 + 9000),
    )
    assert lines.returncode == 0, lines.stderr
    points = [json.loads(line) for line in lines.stdout.splitlines()]
    assert points[:3] == [
        {"ts": T0, "key": "power", "value": 0.0},  # keys in the order given on a tie
        {"ts": T0, "key": "count", "value": 0},
        {"ts": T0 + 1000, "key": "power", "value": 0.5},
    ]
    assert len(points) == 20


def test_export_errors(server: RunningServer, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    missing = cli(server, "export", "--device", "nope", "-o", str(out / "x.csv"))
    assert missing.returncode == 1
    assert "no device named 'nope'" in missing.stderr
    assert not list(out.iterdir())
    backwards = cli(server, "export", "--device", "nope", "--from", "10", "--to", "5")
    assert backwards.returncode == 2
    assert "--from must not be after --to" in backwards.stderr
    bad_time = cli(server, "export", "--device", "nope", "--from", "yesterday")
    assert bad_time.returncode == 2
    assert "neither Unix milliseconds nor an ISO 8601" in bad_time.stderr
