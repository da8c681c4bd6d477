"""MQTT ingest benchmark: iotmesh and Mosquitto side by side, in one invocation.

Run: `.venv/bin/python bench/mqtt_ingest.py` (6-10 minutes, most of it creating 10k
devices and draining the QoS 0 backlog; `--help` for the knobs; quick check:
`--connections 100 --seconds 3 --idle-connections 1000`).
Prints a table and writes bench/results/mqtt_ingest.json (machine, exact settings,
every figure; with `--profile DIR`, py-spy's top functions of the iotmesh server too).

Servers, both started here on free 127.0.0.1 ports and stopped by PID at the end:
- iotmesh: `iotmesh run --log-level warning` via tests/integration/server.py, in a
  temporary data dir (SQLite, synchronous=FULL by default: a PUBACK means committed).
  Devices are created first over REST (POST /api/v1/devices, bounded concurrency);
  every connection logs in as its own device (user name = access token).
- Mosquitto (`/usr/sbin/mosquitto`, its own temporary config: `persistence false`,
  anonymous). One QoS 0 subscriber on `#` (a raw socket that counts bytes) makes it
  relay every message, as a broker in front of a consumer would.

Helpers: bench/_loadgen.py (generator processes), bench/_measure.py (CPU, RSS, quiet
waits, py-spy), bench/_report.py (the table).

The load generator (bench/_loadgen.py): `--processes` worker processes, raw asyncio
Protocols, pre-encoded MQTT 3.1.1 packets, `--connections` connections in all (each a
new client id per phase, clean session, keep-alive 0), each publishing 3-key JSON
telemetry to v1/devices/me/telemetry. It runs on the same machine and competes with
the server for the CPUs; so may other people's jobs on a shared machine. The table
shows CPU of the server, of the generator, and of everything else ("other"). Before
each phase the script waits (bounded) for the server and then the machine to be idle.

Phases, each with `--warmup` seconds of load before `--seconds` measured ones:
1. QoS 1, closed loop, `--window` unacknowledged messages per connection. Reported:
   PUBACKs/s and publish->PUBACK latency (p50, p99). iotmesh acks after the commit;
   Mosquitto acks on receipt (persistence off), so its figure is receive latency.
2. QoS 1 at half the aimed rate (40k msg/s, so 20k), or half of iotmesh's measured QoS 1
   rate if that is lower (`--half-rate` to fix it), open
   loop (rate-limited generator, still at most `--window` unacked per connection), on
   both servers: latency at that rate (for iotmesh: publish->commit).
3. QoS 0 flood (`--window` messages per write while TCP takes them). Reported: msg/s
   sent into TCP during the window (not a server rate: a server that reads without
   back-pressure takes far more than it processes), and end to end: all messages sent
   / seconds from the phase's start until the last was delivered. Delivered means, for
   iotmesh, stored: a sample of connections (`--verify-sample`) send the same
   telemetry with explicit unique timestamps, and their points are counted over REST
   (points at one timestamp overwrite each other); for Mosquitto, received by the
   subscriber. Connections stay open until then (closing cancels unstored work).
4. Idle: `--idle-connections` connections that only CONNECT; server RSS before and
   with them, for iotmesh (target; distinct devices) and Mosquitto (reference). Runs
   first on each server, each on a fresh process.
In each measured window the server's CPU (% of one core, all threads) and RSS are
sampled with psutil on its PID; also the generator's CPU and the machine's. QoS 1
latencies are measured by the generator from write to PUBACK, so they include its own
queueing (it shares the CPUs).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tests.integration.server import RunningServer, iotmesh_command, start_server  # noqa: E402

import _loadgen  # noqa: E402
from _loadgen import Job, Packets, raise_nofile  # noqa: E402
from _measure import (  # noqa: E402
    MB,
    Profiler,
    Sampler,
    machine,
    stop_process,
    tree_rss,
    wait_machine_quiet,
    wait_quiet,
)
from _report import _get, report, summary  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "mqtt_ingest.json"
MOSQUITTO = "/usr/sbin/mosquitto"
TS_BASES = {"qos0": 1_100_000_000_000, "qos1": 1_200_000_000_000, "qos1_half": 1_300_000_000_000}
TS_SPAN = 10**11
# The aim for QoS 1 durable ingest; the latency target applies at half of it (or
# at half of iotmesh's measured rate, if that is lower).
AIM_QOS1_MSGS_PER_S = 40_000
READY_SLACK_S = 60.0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- servers ------------------------------------------------------------------------------


class Mosquitto:
    """A private Mosquitto on a free port (the system one on :1883 is left alone)."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.config = (
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence false\n"
            "max_connections -1\n"
            "log_dest stderr\n"
            "log_type error\n"
            "log_type warning\n"
        )
        workdir.mkdir(parents=True, exist_ok=True)
        conf = workdir / "mosquitto.conf"
        conf.write_text(self.config)
        self.command = [MOSQUITTO, "-c", str(conf)]
        self.log = workdir / "mosquitto.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                self.command, stdout=out, stderr=subprocess.STDOUT, cwd=workdir
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.log.read_text()}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=1),
            ):
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("mosquitto did not listen in time")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        stop_process(self.proc, 10)


def start_iotmesh(workdir: Path, synchronous: str) -> RunningServer:
    data_dir = workdir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    env = {"IOTMESH_STORAGE__SQLITE__SYNCHRONOUS": synchronous}
    return start_server(data_dir, workdir / "logs", "--log-level", "warning", env=env)


def nofile_of(pid: int) -> list[int] | None:
    """The open-files limit (soft, hard) of a process, from /proc (any owner)."""
    try:
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return [int(soft), int(hard)]
    except (OSError, ValueError):
        pass
    return None


async def create_devices(
    server: RunningServer, count: int, concurrency: int
) -> list[dict[str, str]]:
    """Create `count` devices over REST; return their ids and access tokens, in order."""
    headers = {"Authorization": f"Bearer {server.admin_token}"}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    out: list[dict[str, str] | None] = [None] * count
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(
        base_url=server.url, headers=headers, timeout=30, limits=limits
    ) as client:

        async def one(i: int) -> None:
            async with sem:
                r = await client.post("/api/v1/devices", json={"name": f"bench-{i:06d}"})
                r.raise_for_status()
                body = r.json()
                out[i] = {"id": body["id"], "token": body["access_token"]}

        async with asyncio.timeout(max(120.0, count / 20)), asyncio.TaskGroup() as tg:
            for i in range(count):
                tg.create_task(one(i), name=f"create-device-{i}")
    return [d for d in out if d is not None]


async def stored_counts(
    server: RunningServer, device_ids: list[str], ts_base: int
) -> dict[str, int]:
    """Points of key `count` that each device has in [ts_base, ts_base + TS_SPAN)."""
    headers = {"Authorization": f"Bearer {server.admin_token}"}
    async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=60) as client:

        async def one(device_id: str) -> int:
            total, start = 0, ts_base
            for _ in range(100):  # pages of 100k points: bounded
                r = await client.get(
                    f"/api/v1/devices/{device_id}/telemetry",
                    params={
                        "keys": "count",
                        "start_ts": start,
                        "end_ts": ts_base + TS_SPAN - 1,
                        "limit": 100_000,
                        "order": "ASC",
                    },
                )
                r.raise_for_status()
                points = r.json().get("count", [])
                total += len(points)
                if len(points) < 100_000:
                    break
                start = points[-1]["ts"] + 1
            return total

        counts = await asyncio.gather(*(one(d) for d in device_ids))
    return dict(zip(device_ids, counts, strict=True))


def settle_and_count(
    server: RunningServer, device_ids: list[str], ts_base: int, expected: int, t0: float,
    max_s: float,
) -> dict[str, Any]:  # fmt: skip
    """Poll the sample's stored counts until they reach `expected`, or stop changing
    while the server is idle (what is missing then is lost), or `max_s` passes.

    Returns the counts, how long the wait was, when (seconds after the phase's start
    `t0`) the sample was complete, and the server's peak RSS meanwhile (a QoS 0
    backlog lives in the server's memory).
    """
    started = time.monotonic()
    proc = psutil.Process(server.pid)
    proc.cpu_percent(None)
    last: dict[str, int] | None = None
    peak = tree_rss(proc)
    while True:
        counts = asyncio.run(stored_counts(server, device_ids, ts_base))
        now = time.monotonic()
        peak = max(peak, tree_rss(proc))
        busy = proc.cpu_percent(None)
        total = sum(counts.values())
        done = total >= expected
        stuck = counts == last and busy < 5.0
        if done or stuck or now - started > max_s:
            return {
                "counts": counts,
                "settle_s": now - started,
                "complete_after_s": now - t0 if done else None,
                "server_rss_mb_max_settle": peak / MB,
                "timed_out": not done and not stuck,
            }
        last = counts
        time.sleep(0.5 if now - started < 10 else 2.0)


# -- phases -------------------------------------------------------------------------------


def split(items: list[Any], parts: int) -> list[list[Any]]:
    return [items[i::parts] for i in range(parts)]


def run_phase(
    name: str,
    mode: str,
    port: int,
    clients: list[tuple[str, str | None]],
    server_pid: int,
    args: argparse.Namespace,
    *,
    rate: float = 0.0,
    sample: dict[int, int] | None = None,
    subscriber: Any = None,
    on_hold: Any = None,
    profile: Path | None = None,
    counters: Any = None,
) -> dict[str, Any]:
    """Run one phase on P worker processes; return the aggregated figures.

    `sample` maps a client index (in `clients`) to the ts base of its explicit-ts
    payloads; `on_hold(samples, figures)` runs while the connections are still open
    after the measurement (the storage check); what it returns is merged into the result.
    `subscriber` is (pid, byte counter) of the Mosquitto subscriber. `counters()`
    (server counters by name) is read at both ends of the measured window; their
    rates per second go in `out["server_rates"]`.
    """
    ctx = mp.get_context("spawn")
    procs_n = max(1, min(args.processes, len(clients)))
    events = ctx.Queue()
    go, stop = ctx.Event(), ctx.Event()
    start_at = ctx.Value("d", 0.0)
    shares = split(list(enumerate(clients)), procs_n)
    jobs = []
    for w, share in enumerate(shares):
        local_sample = {
            k: (sample or {})[i] for k, (i, _) in enumerate(share) if i in (sample or {})
        }
        jobs.append(
            Job(
                worker=w,
                host="127.0.0.1",
                port=port,
                clients=[c for _, c in share],
                mode=mode,
                window=args.window,
                rate=rate / procs_n if rate else 0.0,
                warmup_s=args.warmup,
                seconds=args.seconds,
                drain_s=args.drain,
                connect_concurrency=args.connect_concurrency,
                keep_alive=0,
                hold_s=args.settle_max + 120.0,
                sample=local_sample,
                nice=args.loadgen_nice,
            )
        )
    procs = [
        ctx.Process(
            target=_loadgen.worker_main,
            args=(job, events, go, stop, start_at),
            name=f"loadgen-{name}-{job.worker}",
        )
        for job in jobs
    ]
    sampler = Sampler(server_pid)
    out: dict[str, Any] = {
        "mode": mode,
        "connections_requested": len(clients),
        "processes": procs_n,
    }
    if rate:
        out["target_rate"] = rate
    try:
        for p in procs:
            p.start()
        log(f"{name}: connecting {len(clients)} clients from {procs_n} processes")
        ready = collect(events, "ready", procs_n, 180.0 + READY_SLACK_S)
        out["connected"] = sum(r["connected"] for r in ready.values())
        out["connect_failed"] = sum(r["failed"] for r in ready.values())
        out["connect_errors"] = sorted({e for r in ready.values() for e in r["errors"]})[:5]
        out["connect_s"] = max(r["connect_s"] for r in ready.values())
        log(
            f"{name}: {out['connected']} connected ({out['connect_failed']} failed) in "
            f"{out['connect_s']:.1f}s"
        )
        if mode == "idle":
            return idle_measure(out, sampler, go, stop, events, procs_n, args)
        helpers = [p.pid for p in procs if p.pid is not None]
        if subscriber is not None:
            helpers.append(subscriber[0])
        sub_start = subscriber[1].value if subscriber is not None else 0
        t0 = time.monotonic() + 0.3
        start_at.value = t0
        go.set()
        t_warm, t_end = t0 + args.warmup, t0 + args.warmup + args.seconds
        time.sleep(max(0.0, t_warm - time.monotonic()))
        profiler = Profiler(server_pid, profile, args.seconds) if profile else None
        sampler.begin(helpers)
        before = counters() if counters is not None else {}
        sub_a = subscriber[1].value if subscriber is not None else 0
        while time.monotonic() < t_end:
            time.sleep(min(0.25, max(0.0, t_end - time.monotonic())))
            sampler.sample()
        out.update(sampler.end())
        if counters is not None:
            after = counters()
            out["server_rates"] = {k: (after[k] - before.get(k, 0.0)) / args.seconds for k in after}
        sub_b = subscriber[1].value if subscriber is not None else 0
        results = collect(events, "result", procs_n, args.drain + 60.0)
        out.update(aggregate(results, args))
        if profiler is not None:
            out["profile"] = profiler.finish()
        if subscriber is not None:
            size = Packets().qos0_size
            out["subscriber_received"] = (sub_b - sub_a) // size
            out["subscriber_msgs_per_s"] = out["subscriber_received"] / args.seconds
            out["relay"] = settle_subscriber(
                subscriber[1], sub_start, size, out["sent_total"], t0, server_pid, args.settle_max
            )
        if on_hold is not None:
            samples = {  # back to indices in `clients` (split() deals them round-robin)
                local * procs_n + w: figures
                for w, r in results.items()
                for local, figures in r["samples"].items()
            }
            out.update(on_hold(samples, t0))
        stop.set()
        collect(events, "closed", procs_n, 30.0)
    finally:
        go.set()
        stop.set()
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join(5)
    return out


def settle_subscriber(
    counter: Any, start: int, size: int, sent: int, t0: float, broker_pid: int, max_s: float
) -> dict[str, Any]:
    """After a Mosquitto phase: wait until the subscriber got everything that was sent,
    or its count stops while the broker is idle, or `max_s` passes; compare."""
    started = time.monotonic()
    proc = psutil.Process(broker_pid)
    proc.cpu_percent(None)
    last = -1
    peak = proc.memory_info().rss
    while True:
        now_count = counter.value
        now = time.monotonic()
        peak = max(peak, proc.memory_info().rss)
        done = (now_count - start) // size >= sent
        stuck = now_count == last and proc.cpu_percent(None) < 5.0
        if done or stuck or now - started > max_s:
            break
        last = now_count
        time.sleep(0.25)
    received = (counter.value - start) // size
    return {
        "sent": sent,
        "received": received,
        "received_over_sent": received / sent if sent else None,
        "settle_s": now - started,
        "complete_after_s": now - t0 if done else None,
        "server_rss_mb_max_settle": peak / MB,
    }


def idle_measure(
    out: dict[str, Any],
    sampler: Sampler,
    go: Any,
    stop: Any,
    events: Any,
    procs_n: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    go.set()
    time.sleep(args.idle_settle)  # let the server settle (GC, buffers) with them open
    out["server_rss_mb_with_idle"] = sampler.proc.memory_info().rss / MB
    out["server_tree_rss_mb_with_idle"] = sampler.tree_rss() / MB
    out["server_connections"] = len(sampler.proc.net_connections(kind="tcp")) - 1
    collect(events, "result", procs_n, 30.0)
    stop.set()
    collect(events, "closed", procs_n, 60.0)
    return out


def collect(events: Any, kind: str, count: int, timeout: float) -> dict[int, Any]:
    got: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    while len(got) < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"only {len(got)}/{count} workers sent {kind!r}")
        try:
            what, worker, body = events.get(timeout=remaining)
        except Exception as exc:  # queue.Empty
            raise TimeoutError(f"only {len(got)}/{count} workers sent {kind!r}") from exc
        if what == "error":
            raise RuntimeError(f"load generator {worker} failed: {body}")
        if what == kind:
            got[worker] = body
    return got


def aggregate(results: dict[int, Any], args: argparse.Namespace) -> dict[str, Any]:
    seconds = max(r["measured_s"] for r in results.values())
    sent = sum(r["sent"] for r in results.values())
    acked = sum(r["acked"] for r in results.values())
    lat = np.concatenate(
        [np.frombuffer(r["latencies"], dtype=np.float64) for r in results.values()]
    )
    out: dict[str, Any] = {
        "measured_s": seconds,
        "sent": sent,
        "acked": acked,
        "sent_msgs_per_s": sent / seconds,
        "acked_msgs_per_s": acked / seconds,
        "generator_own_cpu_pct": 100 * sum(r["cpu_s"] for r in results.values()) / seconds,
        "lost_connections": sum(r["lost"] for r in results.values()),
        "unacked_after_drain": sum(r["unacked_after_drain"] for r in results.values()),
        "sent_total": sum(r["sent_total"] for r in results.values()),
        "unsent_after_drain": sum(r["unsent_after_drain"] for r in results.values()),
        "acked_total": sum(r["acked_total"] for r in results.values()),
        "skipped": sum(r["skipped"] for r in results.values()),
    }
    if len(lat):
        ms = lat * 1000
        out["latency_ms"] = {
            "count": len(ms),
            "p50": float(np.percentile(ms, 50)),
            "p90": float(np.percentile(ms, 90)),
            "p99": float(np.percentile(ms, 99)),
            "p999": float(np.percentile(ms, 99.9)),
            "max": float(ms.max()),
            "mean": float(ms.mean()),
        }
    return out


# -- per server ---------------------------------------------------------------------------


def pick_sample(n: int, k: int) -> list[int]:
    """`k` client indices spread over `n` (both generator processes get some)."""
    if k <= 0 or n == 0:
        return []
    step = max(1, n // k)
    return list(range(0, n, step))[:k]


def phase_plan(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(phase, mode) in run order: QoS 1 first, so that the QoS 0 flood's backlog
    cannot weigh on the main figure; the half-rate run needs the QoS 1 result."""
    plan = [("qos1", "qos1"), ("qos1_half", "qos1"), ("qos0", "qos0")]
    return [(p, m) for p, m in plan if p not in args.skip_phase]


def bench_iotmesh(args: argparse.Namespace, workdir: Path, run: dict[str, Any]) -> dict[str, Any]:
    res: dict[str, Any] = {}
    server = start_iotmesh(workdir, args.synchronous)
    try:
        res["pid"] = server.pid
        res["command"] = iotmesh_command(
            "run", "--data-dir", "TMP/data", "--http-port", "0", "--mqtt-port", "0",
            "--coap-port", "0", "--log-level", "warning",
        )  # fmt: skip
        res["nofile"] = nofile_of(server.pid)
        log(f"iotmesh: pid {server.pid}, mqtt port {server.mqtt_port}, nofile {res['nofile']}")
        need = max(args.connections, 0 if args.skip_idle else args.idle_connections)
        started = time.monotonic()
        devices = asyncio.run(create_devices(server, need, args.device_concurrency))
        res["devices_created"] = len(devices)
        res["device_create_s"] = time.monotonic() - started
        log(f"iotmesh: {len(devices)} devices created in {res['device_create_s']:.1f}s")
        proc = psutil.Process(server.pid)
        if not args.skip_idle:
            wait_quiet(server.pid, args.quiet_max)
            before = proc.memory_info().rss / MB
            before_tree = tree_rss(proc) / MB
            idle_clients: list[tuple[str, str | None]] = [
                (f"idle-{i}", d["token"]) for i, d in enumerate(devices[: args.idle_connections])
            ]
            res["idle"] = run_phase(
                "iotmesh-idle", "idle", server.mqtt_port, idle_clients, server.pid, args
            )
            res["idle"]["server_rss_mb_before"] = before
            res["idle"]["server_tree_rss_mb_before"] = before_tree
            time.sleep(1)
            res["idle"]["server_rss_mb_after_close"] = proc.memory_info().rss / MB
            log(
                f"iotmesh idle: RSS {before:.0f} MB -> "
                f"{res['idle']['server_rss_mb_with_idle']:.0f} MB with "
                f"{res['idle']['connected']} connections (with the writer process: "
                f"{before_tree:.0f} -> {res['idle']['server_tree_rss_mb_with_idle']:.0f} MB)"
            )
        load = devices[: args.connections]
        sample_idx = pick_sample(len(load), args.verify_sample)

        def check(phase: str) -> Any:
            def on_hold(samples: dict[int, Any], t0: float) -> dict[str, Any]:
                ids = [load[i]["id"] for i in sample_idx if i in samples]
                sent = sum(samples[i]["sent"] for i in sample_idx if i in samples)
                acked = sum(samples[i]["acked"] for i in sample_idx if i in samples)
                expected = acked if phase != "qos0" else sent
                settled = settle_and_count(
                    server, ids, TS_BASES[phase], expected, t0, args.settle_max
                )
                stored = sum(settled.pop("counts").values())
                return {
                    "verify": {
                        "devices": len(ids),
                        "sent": sent,
                        "acked": acked,
                        "stored": stored,
                        "stored_over_sent": stored / sent if sent else None,
                        "stored_ge_acked": stored >= acked,
                        **settled,
                    }
                }

            return on_hold

        for phase, mode in phase_plan(args):
            rate = 0.0
            if phase == "qos1_half":
                measured = _get(res, "qos1", "acked_msgs_per_s") or 0.0
                rate = args.half_rate or min(measured, AIM_QOS1_MSGS_PER_S) / 2
                run["half_rate"] = rate
                if not rate:
                    continue
            quiet = wait_quiet(server.pid, args.quiet_max)
            machine_gate = wait_machine_quiet(args.machine_quiet_max, args.machine_quiet_below)
            clients: list[tuple[str, str | None]] = [
                (f"{phase}-{i}", d["token"]) for i, d in enumerate(load)
            ]
            profile = args.profile / f"iotmesh-{phase}.txt" if args.profile else None
            res[phase] = run_phase(
                f"iotmesh-{phase}", mode, server.mqtt_port, clients, server.pid, args,
                rate=rate, sample=dict.fromkeys(sample_idx, TS_BASES[phase]),
                on_hold=check(phase), profile=profile, counters=server_counters(server),
            )  # fmt: skip
            res[phase]["quiet_wait_s"] = quiet
            res[phase].update(machine_gate)
            log(f"iotmesh {phase}: {summary(res[phase])}")
        res["exit_code"] = server.stop()
        res["server_log_tail"] = server.output()[-3000:]
    finally:
        server.stop()
    return res


SERVER_COUNTERS = {  # /metrics name -> key in the phase's "server_rates"
    "iotmesh_writer_commits_total": "commits",
    "iotmesh_writer_records_total": "records",
    "iotmesh_writer_commit_ms_total": "commit_ms",
    "iotmesh_event_loop_lag_ms_total": "loop_lag_ms",
    "iotmesh_event_loop_samples_total": "loop_samples",
    "iotmesh_event_loop_stalls_total": "loop_stalls",
}


def server_counters(server: RunningServer) -> Any:
    """A reader of the server's commit and event-loop counters on /metrics."""

    def read() -> dict[str, float]:
        text = httpx.get(f"{server.url}/metrics", timeout=10).text
        return {
            SERVER_COUNTERS[name]: float(value)
            for name, value in (line.split() for line in text.splitlines() if line[:1] != "#")
            if name in SERVER_COUNTERS
        }

    return read


def bench_mosquitto(args: argparse.Namespace, workdir: Path, run: dict[str, Any]) -> dict[str, Any]:
    res: dict[str, Any] = {}
    if not args.skip_idle:
        broker = Mosquitto(workdir / "idle")
        try:
            before = psutil.Process(broker.pid).memory_info().rss / MB
            idle: list[tuple[str, str | None]] = [
                (f"idle-{i}", None) for i in range(args.idle_connections)
            ]
            res["idle"] = run_phase("mosquitto-idle", "idle", broker.port, idle, broker.pid, args)
            res["idle"]["server_rss_mb_before"] = before
        finally:
            broker.stop()
    broker = Mosquitto(workdir / "load")
    ctx = mp.get_context("spawn")
    received = ctx.RawValue("q", 0)
    ready, stop = ctx.Event(), ctx.Event()
    sub = ctx.Process(
        target=_loadgen.subscriber_main,
        args=("127.0.0.1", broker.port, received, ready, stop, 1800.0),
        name="mosquitto-subscriber",
    )
    try:
        res["pid"] = broker.pid
        res["command"] = broker.command
        res["config"] = broker.config
        res["nofile"] = nofile_of(broker.pid)
        log(f"mosquitto: pid {broker.pid}, port {broker.port}, nofile {res['nofile']}")
        sub.start()
        if not ready.wait(15) or sub.pid is None:
            raise RuntimeError("the Mosquitto subscriber did not subscribe in time")
        for phase, mode in phase_plan(args):
            rate = 0.0
            if phase == "qos1_half":
                rate = run.get("half_rate") or args.half_rate
                if not rate and "qos1" in res:
                    rate = res["qos1"]["acked_msgs_per_s"] / 2
                    res["half_rate_note"] = "no iotmesh run: half of Mosquitto's QoS 1 rate"
                if not rate:
                    continue
            quiet = wait_quiet(broker.pid, args.quiet_max)
            machine_gate = wait_machine_quiet(args.machine_quiet_max, args.machine_quiet_below)
            clients: list[tuple[str, str | None]] = [
                (f"{phase}-{i}", None) for i in range(args.connections)
            ]
            res[phase] = run_phase(
                f"mosquitto-{phase}", mode, broker.port, clients, broker.pid, args,
                rate=rate, subscriber=(sub.pid, received),
            )  # fmt: skip
            res[phase]["quiet_wait_s"] = quiet
            res[phase].update(machine_gate)
            log(f"mosquitto {phase}: {summary(res[phase])}")
        res["log_tail"] = broker.log.read_text()[-3000:]
    finally:
        stop.set()
        sub.join(5)
        if sub.is_alive():
            sub.kill()
            sub.join(5)
        broker.stop()
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--connections", type=int, default=1000, help="publishing connections (devices)")
    add("--processes", type=int, default=2, help="load generator processes")
    add("--seconds", type=float, default=10.0, help="measured seconds per phase")
    add("--warmup", type=float, default=2.0, help="seconds of load before measuring")
    add("--drain", type=float, default=3.0, help="seconds to wait for the last acks")
    add("--window", type=int, default=8, help="QoS 1 unacked messages per connection "
        "(QoS 0: messages per write)")  # fmt: skip
    add("--half-rate", type=float, default=0.0, help="msg/s of the half-rate run (default: "
        "half of 40k msg/s, or of iotmesh's measured QoS 1 rate if lower)")  # fmt: skip
    add("--idle-connections", type=int, default=10_000)
    add("--idle-settle", type=float, default=3.0, help="seconds idle before RSS is read")
    add("--skip-idle", action="store_true")
    add("--skip-iotmesh", action="store_true")
    add("--skip-mosquitto", action="store_true")
    add(
        "--synchronous",
        choices=["FULL", "NORMAL"],
        default="FULL",
        help="iotmesh's storage.sqlite.synchronous: FULL (default; a commit survives power "
        "loss) or NORMAL (survives a crash of the process, not of the machine)",
    )
    add("--loadgen-nice", type=int, default=0, help="raise the generator processes' nice "
        "value by N (0-19): the server, at the default priority, then preempts them when "
        "both want a CPU, as if the load came from another machine")  # fmt: skip
    add("--skip-phase", action="append", default=[], choices=["qos0", "qos1", "qos1_half"])
    add("--verify-sample", type=int, default=10, help="iotmesh devices whose points are counted")
    add("--device-concurrency", type=int, default=32, help="concurrent REST device creations")
    add("--connect-concurrency", type=int, default=200, help="concurrent CONNECTs per process")
    add("--quiet-max", type=float, default=60.0, help="longest wait for an idle server "
        "between phases")  # fmt: skip
    add("--settle-max", type=float, default=180.0, help="longest wait after a phase for "
        "its messages to be stored (iotmesh sample) or relayed (Mosquitto)")  # fmt: skip
    add("--machine-quiet-max", type=float, default=60.0, help="longest wait, before each "
        "phase, for the rest of the machine to be quiet (shared machines)")  # fmt: skip
    add("--machine-quiet-below", type=float, default=30.0, help="quiet: machine CPU below "
        "this %% of one core")  # fmt: skip
    add("--profile", type=Path, default=None, help="directory: py-spy the iotmesh server "
        "in each measured window (raw stacks + top functions in the JSON)")  # fmt: skip
    add("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    soft, hard = raise_nofile()  # the servers and generator processes inherit it
    need = max(args.connections, 0 if args.skip_idle else args.idle_connections)
    notes = []
    if soft < need + 1000:
        notes.append(f"RLIMIT_NOFILE is {soft} (hard {hard}): too low for {need} connections")
    if hard < 65536:
        notes.append(f"RLIMIT_NOFILE hard limit is {hard}; raising it is not permitted here")
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    settings: dict[str, Any] = {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
    }
    packets = Packets()
    settings.update(
        {
            "command": " ".join([sys.executable, *sys.argv]),
            "mqtt_version": "3.1.1",
            "topic": _loadgen.TOPIC,
            "payload_example": _loadgen.payload(0).decode(),
            "storage_check_payload_example": _loadgen.timed_payload(TS_BASES["qos1"], 0).decode(),
            "qos0_packet_bytes": packets.qos0_size,
            "qos1_packet_bytes": packets.qos1_size,
            "keep_alive": 0,
            "clean_session": True,
            "nofile_soft_hard": [soft, hard],
            "mosquitto_persistence": False,
            "iotmesh_sqlite_synchronous": args.synchronous,
            "loadgen_nice": args.loadgen_nice,
            "phase_order": [p for p, _ in phase_plan(args)],
        }
    )
    results: dict[str, Any] = {"machine": machine(), "settings": settings, "notes": notes}
    workdir = Path(tempfile.mkdtemp(prefix="iotmesh-mqtt-bench-"))
    try:
        if not args.skip_iotmesh:
            results["iotmesh"] = bench_iotmesh(args, workdir / "iotmesh", results)
        if not args.skip_mosquitto:
            results["mosquitto"] = bench_mosquitto(args, workdir / "mosquitto", results)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    args.output.parent.mkdir(exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    report(results)
    for note in notes:
        print("note:", note)


if __name__ == "__main__":
    main()
