"""Server-side RPC benchmark: what storing every request costs, end to end.

Run: `.venv/bin/python bench/rpc.py` (under a minute; `--help` for the knobs).
Prints a table and writes bench/results/rpc.json.

A real `iotmesh run` (tests/integration/server.py, temporary data dir, SQLite
synchronous=FULL: every request is an INSERT and its status changes are batched
UPDATEs, each a commit) on free 127.0.0.1 ports, stopped by its PID at the end. One
paho-mqtt device, subscribed to `v1/devices/me/rpc/request/+` at QoS 1, answers every
request at once from its network thread.

1. Round trip: `--calls` two-way calls `POST /api/v1/devices/{id}/rpc` (not
   persistent), `--concurrency` at a time (httpx, asyncio). Reported: calls/s and the
   REST latency p50/p99 (insert, dispatch, PUBLISH, PUBACK, reply, HTTP answer).
2. Offline drain: with the device offline, `--queued` persistent requests are posted;
   then it connects and subscribes. Reported: post rate, and the time from its SUBACK
   until the list shows every request SUCCESSFUL (one request in flight at a time per
   device: each waits for its PUBACK before the next goes out).
Everything is bounded in count and time (`--max-seconds` per phase).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tests.integration.server import RunningServer, start_server  # noqa: E402

from _measure import machine  # noqa: E402

REQUESTS = "v1/devices/me/rpc/request/+"


class Responder:
    """A paho device that answers every RPC request with {"ok": true, "n": id}."""

    def __init__(self, port: int, token: str) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        self.client.username_pw_set(token)
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.port = port
        self.answered = 0
        self.subscribed = threading.Event()

    def _on_message(self, client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        request_id = message.topic.rsplit("/", 1)[1]
        body = json.dumps({"ok": True, "n": int(request_id)})
        client.publish(f"v1/devices/me/rpc/response/{request_id}", body, qos=1)
        self.answered += 1

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, rcs: Any, props: Any) -> None:
        self.subscribed.set()

    def start(self) -> float:
        """Connect, subscribe; return the time the SUBACK arrived (monotonic)."""
        self.client.connect("127.0.0.1", self.port, keepalive=60)
        self.client.loop_start()
        self.client.subscribe(REQUESTS, qos=1)
        if not self.subscribed.wait(10):
            raise RuntimeError("no SUBACK")
        return time.monotonic()

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def round_trips(srv: RunningServer, device_id: str, args: argparse.Namespace) -> Any:
    headers = {"Authorization": f"Bearer {srv.admin_token}"}
    latencies: list[float] = []
    failures = 0
    deadline = time.monotonic() + args.max_seconds
    todo = iter(range(args.calls))
    body = {"method": "bench", "params": {"x": 1}, "timeout_ms": 10_000}

    async with httpx.AsyncClient(base_url=srv.url, headers=headers, timeout=30) as client:

        async def worker() -> None:
            nonlocal failures
            for _ in todo:
                if time.monotonic() > deadline:
                    return
                t0 = time.perf_counter()
                r = await client.post(f"/api/v1/devices/{device_id}/rpc", json=body)
                latencies.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    failures += 1

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        elapsed = time.perf_counter() - start
    return {
        "calls": len(latencies),
        "failures": failures,
        "seconds": elapsed,
        "calls_per_s": len(latencies) / elapsed,
        "p50_ms": pct(latencies, 0.50) * 1000,
        "p99_ms": pct(latencies, 0.99) * 1000,
        "mean_ms": statistics.fmean(latencies) * 1000,
    }


def drain(srv: RunningServer, admin: httpx.Client, args: argparse.Namespace) -> dict[str, Any]:
    dev = admin.post("/api/v1/devices", json={"name": "bench-offline"}).json()
    body = {"method": "queued", "params": {}, "persistent": True, "timeout_ms": 60_000}
    t0 = time.perf_counter()
    for _ in range(args.queued):
        r = admin.post(f"/api/v1/devices/{dev['id']}/rpc", json=body)
        assert r.status_code == 200, r.text
    post_s = time.perf_counter() - t0
    responder = Responder(srv.mqtt_port, dev["access_token"])
    subscribed = responder.start()
    done = 0
    deadline = subscribed + args.max_seconds
    try:
        while time.monotonic() < deadline:
            page = admin.get(
                f"/api/v1/devices/{dev['id']}/rpc",
                params={"status": "SUCCESSFUL", "page_size": 1},
            ).json()
            done = page["total"]
            if done >= args.queued:
                break
            time.sleep(0.02)
        drain_s = time.monotonic() - subscribed
    finally:
        responder.stop()
    return {
        "queued": args.queued,
        "post_per_s": args.queued / post_s,
        "successful": done,
        "drain_seconds": drain_s,
        "delivered_per_s": done / drain_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--queued", type=int, default=1000)
    parser.add_argument("--max-seconds", type=float, default=60.0)
    args = parser.parse_args()
    results: dict[str, Any] = {"machine": machine(), "settings": vars(args)}
    with tempfile.TemporaryDirectory(prefix="iotmesh-bench-rpc-") as tmp:
        work = Path(tmp)
        (work / "data").mkdir()
        env = {"IOTMESH_DEVICES__RPC_MAX_OPEN": str(max(100, args.queued, args.concurrency))}
        srv = start_server(work / "data", work / "logs", "--log-level", "warning", env=env)
        try:
            with srv.admin() as admin:
                dev = admin.post("/api/v1/devices", json={"name": "bench-online"}).json()
                responder = Responder(srv.mqtt_port, dev["access_token"])
                responder.start()
                try:
                    results["round_trip"] = asyncio.run(round_trips(srv, dev["id"], args))
                finally:
                    responder.stop()
                results["drain"] = drain(srv, admin, args)
        finally:
            srv.stop()
    rt, dr = results["round_trip"], results["drain"]
    print(f"machine: {results['machine']['cpu_count']} x {results['machine']['cpu_model']}")
    print("| measure | result |")
    print("|---|---|")
    print(
        f"| round trip, {rt['calls']} calls, {args.concurrency} at a time "
        f"({rt['failures']} failed) | {rt['calls_per_s']:,.0f} calls/s; "
        f"p50 {rt['p50_ms']:.1f} ms, p99 {rt['p99_ms']:.1f} ms |"
    )
    print(
        f"| {dr['queued']} persistent requests posted (one at a time) | {dr['post_per_s']:,.0f}/s |"
    )
    print(
        f"| offline drain: SUBACK → {dr['successful']} SUCCESSFUL | "
        f"{dr['drain_seconds']:.2f} s ({dr['delivered_per_s']:,.0f} requests/s) |"
    )
    out = ROOT / "bench" / "results" / "rpc.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
