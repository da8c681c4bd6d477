"""HTTP ingest benchmark: durable device telemetry over HTTP/1.1 (wrk) and HTTP/2 (h2load),
iotmesh side by side with a bare ASGI app on the same server software, in one invocation.

Run: `.venv/bin/python bench/http_ingest.py` (about 2 minutes; `--help` for the knobs;
quick check: `--seconds 3 --servers granian`). Needs `wrk` (Debian: `apt-get install -y
wrk`) and `h2load` (Debian: `nghttp2-client`); py-spy only with `--profile DIR`.
Prints a table and writes bench/results/http_ingest.json (machine, settings, figures).

Servers, started here on free 127.0.0.1 ports and stopped by PID at the end, for each
server software in `--servers` (granian, the default of `http.server`, and hypercorn):
- iotmesh: `iotmesh run --log-level warning` (tests/integration/server.py) in a
  temporary data dir, `IOTMESH_HTTP__SERVER` set; one device created over REST. Every
  200 means the point is committed to SQLite (synchronous=FULL).
- bare: bench/_bare_asgi.py, an ASGI app that reads the body and answers 200, served by
  the same iotmesh server class with the same settings: the ceiling of the server
  software on this machine, without the platform behind it.

Load, each run `--warmup` seconds then `--seconds` measured, bounded in time:
- HTTP/1.1: `wrk -t T -c C --latency -s post.lua` (a small Lua script: POST
  `{"temperature": 21.5}` with Content-Type JSON to /api/v1/{token}/telemetry).
  Reported: requests/s, latency p50/p99 (wrk's), non-2xx and socket errors.
- HTTP/2 (h2c, prior knowledge): `h2load -c C -m M -D S -d body.json --log-file F`;
  latency p50/p99 are computed from its per-request log. Reported: requests/s, errors
  (failed, errored, timeouts, non-2xx).
Durability check (iotmesh): the writer's committed-records counter (GET /api/v1/stats)
grows by at least the number of 200s the load generator saw (one record per request).
The load generators run on the same 2 cores as the server; the CPU of both is sampled
(bench/_measure.py) and reported, and so is everything else the machine ran ("other").
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tests.integration.server import RunningServer, child_env, start_server  # noqa: E402

from _measure import Profiler, Sampler, machine, stop_process, wait_machine_quiet  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "http_ingest.json"
TARGET_REQ_S = 10_000
BODY = b'{"temperature": 21.5}'
LUA = f"""wrk.method = "POST"
wrk.body = '{BODY.decode()}'
wrk.headers["Content-Type"] = "application/json"
"""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- servers ------------------------------------------------------------------------------


class Bare:
    """bench/_bare_asgi.py in a process of its own."""

    def __init__(self, workdir: Path, server: str) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        port_file = workdir / "port"
        self.command = [sys.executable, str(ROOT / "bench" / "_bare_asgi.py"), "--server",
                        server, "--port-file", str(port_file)]  # fmt: skip
        env = child_env({"PYTHONPATH": str(ROOT / "src")})
        with (workdir / "log").open("wb") as out:
            self.proc = subprocess.Popen(self.command, stdout=out, stderr=out, env=env)
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    "bare ASGI server did not start: " + (workdir / "log").read_text()
                )
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{port_file.read_text()}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        stop_process(self.proc, 15)


def start_iotmesh(workdir: Path, server: str) -> tuple[RunningServer, str, str]:
    """A running iotmesh and the telemetry URL of a new device, and that device's id."""
    data_dir = workdir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    srv = start_server(data_dir, workdir / "logs", "--log-level", "warning",
                       env={"IOTMESH_HTTP__SERVER": server})  # fmt: skip
    with srv.admin() as admin:
        device = admin.post("/api/v1/devices", json={"name": "bench"}).json()
    return srv, f"{srv.url}/api/v1/{device['access_token']}/telemetry", device["id"]


def committed_records(srv: RunningServer) -> int:
    with srv.admin() as admin:
        return int(admin.get("/api/v1/stats").json()["writer"]["records"])


# -- load generators ----------------------------------------------------------------------


def run_wrk(url: str, seconds: float, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    script = workdir / "post.lua"
    script.write_text(LUA)
    cmd = ["wrk", "-t", str(args.wrk_threads), "-c", str(args.wrk_connections),
           "-d", f"{seconds:g}s", "--latency", "-s", str(script), url]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return {"proc": proc, "command": " ".join(cmd), "parse": _parse_wrk}


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}[unit]


def _parse_wrk(out: str, workdir: Path) -> dict[str, Any]:
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
    if rate is None or total is None:
        return {"error": out[-2000:]}
    lat = dict(re.findall(r"^\s+(50|99)%\s+([\d.]+\w+)", out, re.M))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = sum(int(x) for x in sock.groups()) if sock else 0
    bad = int(non2xx[1]) if non2xx else 0
    return {
        "req_per_s": float(rate[1]),
        "requests": int(total[1]),
        "ok": int(total[1]) - bad,
        "non_2xx": bad,
        "socket_errors": errors,
        "latency_ms": {"p50": _ms(lat["50"]), "p99": _ms(lat["99"])} if lat else None,
    }


def run_h2load(url: str, seconds: float, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    body = workdir / "body.json"
    body.write_bytes(BODY)
    logfile = workdir / "h2load.log"
    logfile.unlink(missing_ok=True)
    cmd = ["h2load", "-t", str(args.h2_threads), "-c", str(args.h2_connections),
           "-m", str(args.h2_streams), "-D", f"{seconds:g}", "-d", str(body),
           "-H", "Content-Type: application/json", "--log-file", str(logfile), url]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return {"proc": proc, "command": " ".join(cmd), "parse": _parse_h2load}


def _parse_h2load(out: str, workdir: Path) -> dict[str, Any]:
    rate = re.search(r"finished in ([\d.]+)(\w+), ([\d.]+) req/s", out)
    req = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) "
                    r"failed, (\d+) errored, (\d+) timeout", out)  # fmt: skip
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    if rate is None or req is None or codes is None:
        return {"error": out[-2000:]}
    latencies = []
    logfile = workdir / "h2load.log"
    if logfile.exists():  # per request: start (s), status, latency (us)
        for line in logfile.read_text().splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[1].isdigit():
                latencies.append(int(parts[2]) / 1000)
    pct = np.percentile(latencies, [50, 99]) if latencies else None
    return {
        "req_per_s": float(rate[3]),
        "requests": int(req[2]),
        "ok": int(codes[1]),
        "non_2xx": int(codes[2]) + int(codes[3]) + int(codes[4]),
        "socket_errors": int(req[4]) + int(req[5]) + int(req[6]),
        "latency_ms": {"p50": float(pct[0]), "p99": float(pct[1])} if pct is not None else None,
        "latency_samples": len(latencies),
    }


def measure(
    name: str, url: str, pid: int, loader: str, args: argparse.Namespace, workdir: Path,
    srv: RunningServer | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Warm up, then one bounded measured run of `loader` against `url`."""
    start = run_wrk if loader == "wrk" else run_h2load
    quiet = wait_machine_quiet(args.machine_quiet_max, args.machine_quiet_below)
    if args.warmup > 0:
        warm = start(url, args.warmup, args, workdir)
        warm["proc"].communicate(timeout=args.warmup + 60)
    records_before = committed_records(srv) if srv is not None else None
    sampler = Sampler(pid)
    children_before = _children_cpu_s()
    run = start(url, args.seconds, args, workdir)
    sampler.begin([])
    profiler = None
    if args.profile and srv is not None:
        profiler = Profiler(pid, args.profile / f"{name}-{loader}.txt", args.seconds - 1)
    try:
        out, _ = run["proc"].communicate(timeout=args.seconds + 60)
    except subprocess.TimeoutExpired:
        run["proc"].kill()
        out, _ = run["proc"].communicate()
    res: dict[str, Any] = {"command": run["command"], **sampler.end(), **quiet}
    # The generator has exited by now, so its CPU comes from the rusage of reaped children.
    loadgen = 100 * (_children_cpu_s() - children_before) / args.seconds
    res["loadgen_cpu_pct"] = loadgen
    res["other_cpu_pct"] = max(0.0, res["machine_cpu_pct"] - res["server_cpu_pct"] - loadgen)
    res.update(run["parse"](out, workdir))
    if res.get("req_per_s"):
        # Less sensitive than req/s to what else the shared machine runs meanwhile.
        res["server_cpu_us_per_req"] = 1e4 * res["server_cpu_pct"] / res["req_per_s"]
    if profiler is not None:
        res["profile"] = profiler.finish()
    if srv is not None and records_before is not None and "ok" in res:
        time.sleep(1.0)  # acks after commit: nothing should be pending; be sure anyway
        res["records_committed"] = committed_records(srv) - records_before
        res["durable_check"] = res["records_committed"] >= res["ok"]
    log(f"{name} {loader}: {summary(res)}")
    return res


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def summary(r: dict[str, Any]) -> str:
    if "error" in r:
        return "ERROR " + r["error"][-300:]
    lat = r.get("latency_ms") or {}
    return (
        f"{r['req_per_s']:,.0f} req/s, p50 {lat.get('p50', 0):.1f} ms, p99 "
        f"{lat.get('p99', 0):.1f} ms, errors {r['non_2xx'] + r['socket_errors']}, CPU server "
        f"{r['server_cpu_pct']:.0f}% loadgen {r['loadgen_cpu_pct']:.0f}% "
        f"other {r['other_cpu_pct']:.0f}%"
    )


def bench_server(server: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    srv, url, _ = start_iotmesh(workdir / f"iotmesh-{server}", server)
    try:
        out["iotmesh"] = {
            loader: measure(f"iotmesh-{server}", url, srv.pid, loader, args, workdir, srv)
            for loader in ("wrk", "h2load")
        }
    finally:
        srv.stop()
    bare = Bare(workdir / f"bare-{server}", server)
    try:
        bare_url = f"{bare.url}/api/v1/token/telemetry"
        out["bare"] = {
            loader: measure(f"bare-{server}", bare_url, bare.pid, loader, args, workdir)
            for loader in ("wrk", "h2load")
        }
    finally:
        bare.stop()
    return out


# -- report -------------------------------------------------------------------------------


def report(results: dict[str, Any]) -> None:
    s = results["settings"]
    table = Table(
        title=f"HTTP telemetry ingest, {s['seconds']:g} s per run: HTTP/1.1 wrk "
        f"{s['wrk_threads']} threads x {s['wrk_connections']} connections; HTTP/2 h2load "
        f"{s['h2_connections']} connections x {s['h2_streams']} streams"
    )
    for col in ("server", "protocol", "iotmesh req/s", "bare req/s", "iotmesh/bare",
                "p50 / p99 ms", "errors", "durable", "CPU server / loadgen / other",
                "server CPU µs/req (bare)",
                f"target {TARGET_REQ_S:,}/s"):  # fmt: skip
        table.add_column(col, justify="left" if col in ("server", "protocol") else "right")
    for server, res in results["runs"].items():
        for loader, proto in (("wrk", "HTTP/1.1"), ("h2load", "HTTP/2 h2c")):
            i, b = res["iotmesh"][loader], res["bare"][loader]
            if "error" in i or "error" in b:
                table.add_row(server, proto, "error", "error", *[""] * 7)
                continue
            lat = i.get("latency_ms") or {"p50": 0, "p99": 0}
            ok = i["req_per_s"] >= TARGET_REQ_S
            table.add_row(
                server, proto, f"{i['req_per_s']:,.0f}", f"{b['req_per_s']:,.0f}",
                f"{i['req_per_s'] / b['req_per_s']:.2f}",
                f"{lat['p50']:.1f} / {lat['p99']:.1f}", str(i["non_2xx"] + i["socket_errors"]),
                "yes" if i.get("durable_check") else "NO",
                f"{i['server_cpu_pct']:.0f}% / {i['loadgen_cpu_pct']:.0f}% / "
                f"{i['other_cpu_pct']:.0f}%",
                f"{i['server_cpu_us_per_req']:.0f} ({b['server_cpu_us_per_req']:.0f})",
                "[green]met[/]" if ok else "[red]NOT met[/]",
            )  # fmt: skip
    Console(width=170).print(table)
    m = results["machine"]
    print(
        f"{m['cpu_model']}, {m['cpu_count']} CPUs, {m['memory_mb'] // 1024} GiB, Python "
        f"{m['python']}. CPU is % of one core; load generators share the CPUs with the "
        "server, and 'other' is what else ran (a shared machine). iotmesh answers 200 after "
        "the SQLite commit (synchronous=FULL); 'durable' "
        "checks that the writer committed at least as many records as 200s were counted. "
        f"Results: {s['output']}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--servers", default="granian,hypercorn", help="comma-separated http.server values")
    add("--seconds", type=float, default=10.0, help="measured seconds per run")
    add("--warmup", type=float, default=2.0, help="seconds of load before each measured run")
    add("--wrk-threads", type=int, default=1)
    add("--wrk-connections", type=int, default=64)
    add("--h2-threads", type=int, default=1)
    add("--h2-connections", type=int, default=4)
    add("--h2-streams", type=int, default=32, help="concurrent streams per HTTP/2 connection")
    add("--machine-quiet-max", type=float, default=120.0, help="longest wait, before each "
        "run, for the rest of the machine to be quiet (shared machines)")  # fmt: skip
    add("--machine-quiet-below", type=float, default=30.0)
    add("--profile", type=Path, default=None, help="directory: py-spy the iotmesh server "
        "in each measured run (raw stacks + top functions in the JSON)")  # fmt: skip
    add("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    for tool in ("wrk", "h2load"):
        with contextlib.suppress(FileNotFoundError):
            subprocess.run([tool, "--version"], capture_output=True, timeout=10, check=False)
            continue
        sys.exit(f"{tool} is missing (Debian: apt-get install -y wrk nghttp2-client)")
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings["command"] = " ".join([sys.executable, *sys.argv])
    settings["body"] = BODY.decode()
    results: dict[str, Any] = {"machine": machine(), "settings": settings, "runs": {}}
    with tempfile.TemporaryDirectory(prefix="iotmesh-http-bench-") as tmp:
        for server in args.servers.split(","):
            (Path(tmp) / server).mkdir()
            results["runs"][server] = bench_server(server, args, Path(tmp) / server)
    args.output.parent.mkdir(exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    report(results)


if __name__ == "__main__":
    main()
