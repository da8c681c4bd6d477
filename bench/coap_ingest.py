"""CoAP telemetry ingest: iotmesh (2.04 after the commit) vs a bare aiocoap server.

The same load generator runs against both, in the same run: `--processes` worker
processes, each with `--clients` UDP sockets (one CoAP client each, so one request
outstanding per client, as RFC 7252's NSTART 1 asks), sending pre-encoded CON
`POST /api/v1/{token}/telemetry` requests with 3-key JSON. Closed loop: a client sends
its next request when the answer to the previous one arrives. Answers are recognised by
their first bytes: a piggybacked 2.04 in an ACK, or an empty ACK followed by a separate
2.04 (which the generator ACKs). 5.03 is counted, not retried; a request unanswered for
`--timeout` seconds is counted lost and the client moves on.

(a) iotmesh: `iotmesh run` in a fresh data dir, one device per client; its 2.04 means
    committed to SQLite (synchronous FULL). A sample of devices is checked afterwards:
    stored points >= acknowledged requests.
(b) bare aiocoap: the same aiocoap version and udp6 transport, a root resource that
    counts each request and answers 2.04 at once; no storage.

Prints a table and writes bench/results/coap_ingest.json (machine, settings, figures).
Every phase is bounded: warm-up + measured seconds, then a drain of at most --timeout.

    .venv/bin/python bench/coap_ingest.py            # ~45-60 s
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._measure import Profiler, machine, process_tree, wait_machine_quiet

RESULTS = Path(__file__).resolve().parent / "results" / "coap_ingest.json"
CON, NON, ACK, RST = 0, 1, 2, 3
POST, CHANGED, SERVICE_UNAVAILABLE = 0x02, 0x44, 0xA3
EMPTY = 0x00

BARE_SERVER = r"""
import asyncio, socket, sys
from aiocoap import Context, Message, interfaces
from aiocoap.numbers.codes import Code
from aiocoap.transports.udp6 import MessageInterfaceUDP6

class Count(interfaces.Resource):
    count = 0
    async def render(self, request):
        raise NotImplementedError
    async def needs_blockwise_assembly(self, request):
        return True
    async def render_to_pipe(self, pipe):
        Count.count += 1
        pipe.add_response(Message(code=Code.CHANGED), is_last=True)

async def main():
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(("::ffff:127.0.0.1", 0))
    loop = asyncio.get_running_loop()
    ctx = Context(loop=loop, serversite=Count())
    await ctx._append_tokenmanaged_messagemanaged_transport(
        lambda m: MessageInterfaceUDP6._create_transport_endpoint(sock, m, ctx.log, loop))
    print(sock.getsockname()[1], flush=True)
    await loop.run_in_executor(None, sys.stdin.read)  # until the bench closes stdin
    print(Count.count, flush=True)
    await ctx.shutdown()

asyncio.run(main())
"""


def _option(delta: int, value: bytes) -> bytes:
    """One CoAP option (deltas and lengths below 269, as ours are)."""

    def nibble(n: int) -> tuple[int, bytes]:
        return (n, b"") if n < 13 else (13, bytes([n - 13]))

    d, d_ext = nibble(delta)
    n, n_ext = nibble(len(value))
    return bytes([(d << 4) | n]) + d_ext + n_ext + value


def request_tail(token: str) -> bytes:
    """Options and payload marker of `POST api/v1/{token}/telemetry`, JSON."""
    opts = _option(11, b"api") + _option(0, b"v1") + _option(0, token.encode())
    opts += _option(0, b"telemetry") + _option(1, b"\x32")  # Content-Format 50
    return opts + b"\xff"


class Client(asyncio.DatagramProtocol):
    """One CoAP client: one CON request outstanding at a time."""

    def __init__(self, worker: Worker, index: int, token: str) -> None:
        self.worker = worker
        self.index = index
        self.tail = request_tail(token)
        self.transport: asyncio.DatagramTransport | None = None
        self.mid = random.randrange(65536)
        self.token = b"\x00\x00"
        self.sent_at = 0.0
        self.n = 0
        self.acked = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send_next(self) -> None:
        w = self.worker
        if not w.running or self.transport is None:
            return
        self.mid = (self.mid + 1) & 0xFFFF
        self.n += 1
        self.token = (self.n & 0xFFFF).to_bytes(2, "big")
        body = b'{"temperature":%d.5,"humidity":%d,"n":%d}' % (self.n % 40, self.n % 100, self.n)
        head = bytes([0x42, POST]) + self.mid.to_bytes(2, "big") + self.token
        self.sent_at = time.perf_counter()
        self.transport.sendto(head + self.tail + body)
        w.sent += 1

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if len(data) < 4:
            return
        mtype, tkl, code = (data[0] >> 4) & 3, data[0] & 15, data[1]
        if code == EMPTY:
            return  # an empty ACK: the answer comes separately
        if data[4 : 4 + tkl] != self.token:
            return  # an answer to an older request we gave up on
        if mtype == CON and self.transport is not None:
            self.transport.sendto(bytes([0x60, EMPTY]) + data[2:4])  # ACK the separate answer
        self.worker.answered(self, code)


class Worker:
    def __init__(self, port: int, tokens: list[str], timeout: float) -> None:
        self.port = port
        self.tokens = tokens
        self.timeout = timeout
        self.running = True
        self.measuring = False
        self.sent = 0
        self.ok = 0
        self.busy = 0
        self.other = 0
        self.lost = 0
        self.latencies: list[float] = []
        self.clients: list[Client] = []

    def answered(self, client: Client, code: int) -> None:
        if code == CHANGED:
            self.ok += 1
            client.acked += 1
            if self.measuring:
                self.latencies.append(time.perf_counter() - client.sent_at)
        elif code == SERVICE_UNAVAILABLE:
            self.busy += 1
        else:
            self.other += 1
        client.sent_at = 0.0
        client.send_next()

    async def watchdog(self) -> None:
        while self.running:
            await asyncio.sleep(0.5)
            now = time.perf_counter()
            for c in self.clients:
                if c.sent_at and now - c.sent_at > self.timeout:
                    self.lost += 1
                    c.send_next()

    def counters(self) -> tuple[int, int, int, int, int]:
        return self.sent, self.ok, self.busy, self.other, self.lost


async def _work(port: int, tokens: list[str], args: dict[str, Any], out: Any) -> None:
    loop = asyncio.get_running_loop()
    w = Worker(port, tokens, args["timeout"])
    for i, token in enumerate(tokens):
        _, client = await loop.create_datagram_endpoint(
            lambda i=i, token=token: Client(w, i, token),
            remote_addr=("127.0.0.1", port),
        )
        w.clients.append(client)
    await asyncio.sleep(max(0.0, args["start_at"] - time.time()))
    dog = asyncio.create_task(w.watchdog())
    for c in w.clients:
        c.send_next()
    await asyncio.sleep(args["warmup"])
    before, w.measuring = w.counters(), True
    await asyncio.sleep(args["seconds"])
    after, w.measuring = w.counters(), False
    w.running = False
    deadline = time.perf_counter() + args["timeout"]
    while any(c.sent_at for c in w.clients) and time.perf_counter() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    dog.cancel()
    delta = [a - b for a, b in zip(after, before, strict=True)]
    out.put(
        {
            "sent": delta[0], "ok": delta[1], "busy": delta[2], "other": delta[3],
            "lost": delta[4], "latencies": w.latencies[:500_000],
            "sample": [(tokens[i], w.clients[i].acked) for i in range(min(3, len(tokens)))],
        }
    )  # fmt: skip
    for c in w.clients:
        if c.transport is not None:
            c.transport.close()


def _worker_main(port: int, tokens: list[str], args: dict[str, Any], out: Any) -> None:
    asyncio.run(_work(port, tokens, args, out))


def _cpu(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def load(
    port: int, tokens: list[str], server_pid: int, args: argparse.Namespace, name: str
) -> dict[str, Any]:
    """Run the generator against `port`; rates, latency percentiles, CPU."""
    quiet = wait_machine_quiet(args.quiet_wait, 30.0)
    per = [tokens[i :: args.processes] for i in range(args.processes)]
    spec = {
        "timeout": args.timeout,
        "warmup": args.warmup,
        "seconds": args.seconds,
        "start_at": time.time() + 1.0,
    }
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    workers = [ctx.Process(target=_worker_main, args=(port, p, spec, out)) for p in per]
    for w in workers:
        w.start()
    server = process_tree(psutil.Process(server_pid))
    gens = [psutil.Process(w.pid) for w in workers if w.pid is not None]
    time.sleep(max(0.0, spec["start_at"] + args.warmup - time.time()))
    profiler = None
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
        profiler = Profiler(server_pid, args.profile / f"{name}.txt", args.seconds)
    cpu0, gen0, all0, t0 = _cpu(server), _cpu(gens), psutil.cpu_times(), time.monotonic()
    time.sleep(args.seconds)
    cpu1, gen1, all1, t1 = _cpu(server), _cpu(gens), psutil.cpu_times(), time.monotonic()
    parts = [out.get(timeout=args.seconds + args.timeout + 60) for _ in workers]
    for w in workers:
        w.join(30)
    elapsed = t1 - t0
    busy_all = (all1.user + all1.system - all0.user - all0.system) / elapsed * 100
    lat = sorted(x for p in parts for x in p["latencies"])

    def pct(q: float) -> float | None:
        return lat[min(len(lat) - 1, int(q * len(lat)))] * 1000 if lat else None

    server_cpu = (cpu1 - cpu0) / elapsed * 100
    gen_cpu = (gen1 - gen0) / elapsed * 100
    total = {k: sum(p[k] for p in parts) for k in ("sent", "ok", "busy", "other", "lost")}
    return {
        **total,
        **quiet,
        **({"profile": profiler.finish()} if profiler is not None else {}),
        "acked_per_s": total["ok"] / args.seconds,
        "latency_ms": {"p50": pct(0.50), "p90": pct(0.90), "p99": pct(0.99), "max": pct(1.0)},
        "server_cpu_pct": server_cpu,
        "loadgen_cpu_pct": gen_cpu,
        "other_cpu_pct": max(0.0, busy_all - server_cpu - gen_cpu),
        "sample": [s for p in parts for s in p["sample"]],
    }


def bench_iotmesh(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    data = workdir / "data"
    data.mkdir()
    cmd = [sys.executable, "-m", "iotmesh", "run", "--data-dir", str(data), "--http-port", "0",
           "--mqtt-port", "0", "--coap-port", "0", "--log-level", "warning"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("IOTMESH_")}
    log = (workdir / "iotmesh.log").open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env)
    try:
        deadline = time.monotonic() + 30
        while not (data / "run.json").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    "iotmesh did not start: " + (workdir / "iotmesh.log").read_text()
                )
            time.sleep(0.1)
        time.sleep(0.5)
        info = json.loads((data / "run.json").read_text())
        admin = httpx.Client(
            base_url=info["http"]["url"],
            headers={"Authorization": "Bearer " + (data / "admin_token").read_text().strip()},
            timeout=30,
        )
        tokens, ids = [], {}
        for i in range(args.clients * args.processes):
            r = admin.post("/api/v1/devices", json={"name": f"bench-{i}"})
            r.raise_for_status()
            tokens.append(r.json()["access_token"])
            ids[tokens[-1]] = r.json()["id"]
        result = load(info["coap"]["port"], tokens, proc.pid, args, "iotmesh")
        checks = []
        for token, acked in result.pop("sample"):
            r = admin.get(
                f"/api/v1/devices/{ids[token]}/telemetry",
                params={"keys": "n", "start_ts": 0, "end_ts": 4_000_000_000_000, "limit": 100_000},
            )
            r.raise_for_status()
            stored = len(r.json().get("n", []))
            checks.append({"acked": acked, "stored": stored})
        result["verify"] = checks
        result["verified"] = all(c["stored"] >= c["acked"] for c in checks)
        admin.close()
        return result
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def bench_bare(args: argparse.Namespace) -> dict[str, Any]:
    proc = subprocess.Popen(
        [sys.executable, "-c", BARE_SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    try:
        port = int(proc.stdout.readline())
        tokens = [f"bare-token-{i:06d}" for i in range(args.clients * args.processes)]
        result = load(port, tokens, proc.pid, args, "bare")
        result.pop("sample")
        proc.stdin.close()
        result["server_counted"] = int(proc.stdout.readline() or 0)
        return result
    finally:
        with contextlib.suppress(OSError):
            proc.stdin.close()
        proc.wait(30)


def _cpu_per(res: dict[str, Any]) -> float | None:
    """Server CPU time per answer, in microseconds: the figure machine load disturbs
    least (a busy machine lowers both servers' rates, not much their cost per answer)."""
    rate = res["acked_per_s"]
    return res["server_cpu_pct"] / 100 / rate * 1e6 if rate else None


def report(results: dict[str, Any]) -> None:
    i, b = results["iotmesh"], results["bare_aiocoap"]
    s = results["settings"]
    table = Table(
        title=f"CoAP ingest: {s['processes']}x{s['clients']} clients (CON, 1 outstanding each), "
        f"{s['seconds']:g} s measured after {s['warmup']:g} s warm-up"
    )
    for col in ("measure", "iotmesh", "bare aiocoap", "iotmesh/bare"):
        table.add_column(col, justify="left" if col == "measure" else "right")

    def row(label: str, a: Any, c: Any, spec: str, unit: str = "", ratio: bool = True) -> None:
        cell = lambda v: "-" if v is None else f"{v:{spec}}{unit}"  # noqa: E731
        r = f"{a / c:.2f}x" if ratio and a is not None and c else ""
        table.add_row(label, cell(a), cell(c), r)

    row("2.04 answers/s", i["acked_per_s"], b["acked_per_s"], ",.0f")
    for q in ("p50", "p90", "p99"):
        row(f"  request->2.04 {q}", i["latency_ms"][q], b["latency_ms"][q], ".1f", " ms")
    row("5.03 / other / lost", i["busy"], b["busy"], ",d", ratio=False)
    table.add_row("", f"{i['other']} / {i['lost']}", f"{b['other']} / {b['lost']}", "")
    row("CPU server (+writer)", i["server_cpu_pct"], b["server_cpu_pct"], ".0f", "%")
    row("  server CPU per 2.04", _cpu_per(i), _cpu_per(b), ".0f", " us")
    row("CPU load generator", i["loadgen_cpu_pct"], b["loadgen_cpu_pct"], ".0f", "%", False)
    row("CPU other (not ours)", i["other_cpu_pct"], b["other_cpu_pct"], ".0f", "%", False)
    Console(width=140).print(table)
    m = results["machine"]
    ok = i["acked_per_s"] >= b["acked_per_s"]
    print(
        f"target iotmesh >= 1.0x bare aiocoap: {'met' if ok else 'NOT met'} "
        f"({i['acked_per_s'] / max(b['acked_per_s'], 1):.2f}x); stored >= acked in the "
        f"sample: {i['verified']} {i['verify']}\n"
        f"{m['cpu_model']}, {m['cpu_count']} CPUs, Python {m['python']}. CPU is % of one core."
        f"\nResults: {s['output']}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--processes", type=int, default=2, help="load generator processes")
    add("--clients", type=int, default=50, help="CoAP clients (UDP sockets) per process")
    add("--seconds", type=float, default=12.0, help="measured seconds per server")
    add("--warmup", type=float, default=3.0, help="seconds before measuring")
    add("--timeout", type=float, default=5.0, help="a request unanswered this long is lost")
    add(
        "--quiet-wait",
        type=float,
        default=10.0,
        help="wait this long at most for the"
        " rest of the machine to use < 30%% of a core before each phase",
    )
    add("--profile", type=Path, help="py-spy each server into this directory")
    add("--output", type=Path, default=RESULTS)
    add("--report", type=Path, help="only print the table of an earlier results file")
    args = parser.parse_args()
    if args.report is not None:
        report(json.loads(args.report.read_text()))
        return
    with tempfile.TemporaryDirectory(prefix="coap-bench-") as tmp:
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        bare = bench_bare(args)
        iot = bench_iotmesh(args, Path(tmp))
    results = {
        "started": started,
        "machine": machine(),
        "settings": {
            **vars(args),
            "output": str(args.output),
            "profile": str(args.profile),
            "report": None,
        },
        "iotmesh": iot,
        "bare_aiocoap": bare,
    }
    results["ratio"] = iot["acked_per_s"] / max(bare["acked_per_s"], 1)
    for res in (iot, bare):
        res["latencies_note"] = "request sent -> 2.04 received, measured window only"
    args.output.parent.mkdir(exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    report(results)


if __name__ == "__main__":
    main()
