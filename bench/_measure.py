"""Measuring for bench/mqtt_ingest.py: machine info, CPU and RSS of the server and of
the rest of the machine over a window, waits for quiet, and py-spy profiles."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

MB = 1024 * 1024


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu,
        "python": sys.version.split()[0],
        "memory_mb": psutil.virtual_memory().total // MB,
    }


def write_host_results(path: Path, args: Any, loop_ns: tuple[float, float], results: Any) -> None:
    """Print the host speed before/after a run and write its JSON (machine, arguments,
    host speed, results) to `path`: the form of the micro-benchmarks (bus, hot state)."""
    print(f"host: {loop_ns[0]:.1f} / {loop_ns[1]:.1f} ns per Python loop iteration")
    path.parent.mkdir(exist_ok=True)
    document = {"machine": machine(), "args": vars(args), "loop_ns": list(loop_ns)}
    path.write_text(json.dumps({**document, "results": results}, indent=2))


def stop_process(proc: subprocess.Popen[Any], timeout_s: float) -> None:
    """SIGTERM a server the benchmark started, SIGKILL it if it has not exited in time."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def process_tree(proc: psutil.Process) -> list[psutil.Process]:
    """A process and its children: iotmesh's server and its SQLite writer process."""
    with contextlib.suppress(psutil.Error):
        return [proc, *proc.children(recursive=True)]
    return [proc]


def tree_rss(proc: psutil.Process) -> int:
    """RSS of a process and its children (bytes)."""
    total = 0
    for p in process_tree(proc):
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


class Sampler:
    """CPU and RSS of the server, CPU of the generator (and subscriber) processes, and
    of the whole machine, over the measured window. CPU figures are % of one core; the
    machine has `cpu_count` cores, so "other" is whatever else ran (other users' jobs).

    The server is its process and its children (iotmesh's SQLite writer process): CPU
    and RSS are summed over them ("server"), and the main process is also reported
    alone ("server_main")."""

    def __init__(self, server_pid: int) -> None:
        self.proc = psutil.Process(server_pid)
        self.helpers: list[psutil.Process] = []
        self.rss: list[int] = []
        self.tree: list[psutil.Process] = [self.proc]

    def tree_rss(self) -> int:
        """RSS of the server and its children (bytes)."""
        return tree_rss(self.proc)

    @staticmethod
    def _cpu(p: psutil.Process) -> float:
        try:
            t = p.cpu_times()
            return float(t.user + t.system)
        except psutil.Error:
            return 0.0

    @staticmethod
    def _machine() -> tuple[float, float, float]:
        t = psutil.cpu_times()
        busy = t.user + t.nice + t.system + t.irq + t.softirq + t.steal
        return busy, busy + t.idle + t.iowait, t.steal

    def begin(self, helper_pids: list[int]) -> None:
        self.helpers = []
        for pid in helper_pids:
            with contextlib.suppress(psutil.Error):
                self.helpers.append(psutil.Process(pid))
        self.t = time.monotonic()
        self.tree = process_tree(self.proc)
        self.cpu = sum(self._cpu(p) for p in self.tree)
        self.main_cpu = self._cpu(self.proc)
        self.helper_cpu = sum(self._cpu(h) for h in self.helpers)
        self.sys = self._machine()
        self.rss = [self.tree_rss()]

    def sample(self) -> None:
        self.rss.append(self.tree_rss())

    def end(self) -> dict[str, Any]:
        wall = time.monotonic() - self.t
        server = 100 * (sum(self._cpu(p) for p in self.tree) - self.cpu) / wall
        server_main = 100 * (self._cpu(self.proc) - self.main_cpu) / wall
        helpers = 100 * (sum(self._cpu(h) for h in self.helpers) - self.helper_cpu) / wall
        busy, total, steal = self._machine()
        cores = psutil.cpu_count() or 1
        d_total = total - self.sys[1]
        machine = 100 * cores * (busy - self.sys[0]) / d_total if d_total else 0.0
        self.sample()
        return {
            "server_cpu_pct": server,
            "server_main_cpu_pct": server_main,
            "loadgen_cpu_pct": helpers,
            "machine_cpu_pct": machine,
            "machine_cores": cores,
            "other_cpu_pct": max(0.0, machine - server - helpers),
            "steal_cpu_pct": 100 * cores * (steal - self.sys[2]) / d_total if d_total else 0.0,
            "server_rss_mb_max": max(self.rss) / MB,
            "server_rss_mb_end": self.rss[-1] / MB,
            "server_threads": self.proc.num_threads(),
        }


def wait_quiet(pid: int, max_s: float, below_pct: float = 10.0) -> float:
    """Wait until the server uses less than `below_pct` of a core over half a second
    (background work of the previous phase done), at most `max_s`; return the wait."""
    proc = psutil.Process(pid)
    started = time.monotonic()
    proc.cpu_percent(None)
    while time.monotonic() - started < max_s:
        time.sleep(0.5)
        if proc.cpu_percent(None) < below_pct:
            break
    return time.monotonic() - started


class Profiler:
    """py-spy on the server during a measured window (`--profile DIR`)."""

    def __init__(self, pid: int, path: Path, seconds: float) -> None:
        self.path = path
        cmd = [
            str(Path(sys.executable).parent / "py-spy"),
            "record", "--pid", str(pid), "--duration", str(max(1, int(seconds))),
            "--format", "raw", "--threads", "--nolineno", "--output", str(path),
        ]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def finish(self) -> dict[str, Any]:
        try:
            _, err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        if not self.path.exists():
            return {"error": err.decode(errors="replace")[-500:]}
        return summarize_profile(self.path)


SCAFFOLDING = (  # frames on every stack of a thread: left out of the inclusive ranking
    "(<frozen runpy>)",
    "(site-packages/typer/",
    "(iotmesh/cli/",
    "(iotmesh/__main__.py)",
    "(asyncio/runners.py)",
    "BaseEventLoop.run_",
    "BaseEventLoop._run_once",
    "Handle._run ",
    "Thread._bootstrap",
    "Thread.run ",
)


WAITING = (  # leaf frames of a thread blocked in C (py-spy may still count it as active)
    "Condition.wait (threading.py)",
    "_worker (concurrent/futures/thread.py)",
    "Queue.get (queue.py)",
    "EpollSelector.select (selectors.py)",
    "Event.wait (threading.py)",
)


def summarize_profile(path: Path, top: int = 15) -> dict[str, Any]:
    """Where the server's time went, from py-spy's raw output (collapsed stacks,
    `process;thread;frame;...;frame count` per line): share of samples per thread, and
    per function self and inclusive (scaffolding left out), overall and per thread.
    py-spy leaves idle threads out, but a worker thread blocked on its queue may still
    show (`WAITING` leaf frames): those samples are counted apart, not ranked."""
    threads: dict[str, int] = {}
    self_t: dict[str, int] = {}
    incl: dict[str, int] = {}
    per_thread: dict[str, dict[str, int]] = {}
    total = waiting = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        thread = next((f for f in frames if f.startswith("thread ")), "thread ?")
        thread = thread.split(": ", 1)[-1].rstrip(")") if ": " in thread else thread
        thread = thread.rstrip("_0123456789") or thread  # tsdb-read_1 -> tsdb-read
        frames = [f for f in frames if not f.startswith(("thread ", "process "))]
        if frames and frames[-1] in WAITING:
            waiting += count
            continue
        total += count
        threads[thread] = threads.get(thread, 0) + count
        if frames:
            leaf = frames[-1]
            self_t[leaf] = self_t.get(leaf, 0) + count
            mine = per_thread.setdefault(thread, {})
            mine[leaf] = mine.get(leaf, 0) + count
        for f in set(frames):
            if not any(s in f for s in SCAFFOLDING):
                incl[f] = incl.get(f, 0) + count

    def share(d: dict[str, int], n: int = top) -> list[tuple[str, float]]:
        ranked = sorted(d.items(), key=lambda kv: -kv[1])[:n]
        return [(name, round(100 * k / total, 1)) for name, k in ranked]

    return {
        "file": str(path),
        "samples": total,
        "waiting_samples_left_out": waiting,
        "threads_pct": share(threads),
        "self_pct": share(self_t),
        "inclusive_pct": share(incl, 2 * top),
        "self_pct_by_thread": {t: share(d, 10) for t, d in per_thread.items()},
    }


def machine_busy(seconds: float) -> float:
    """CPU of the whole machine over `seconds`, in % of one core."""
    a = psutil.cpu_times()
    time.sleep(seconds)
    b = psutil.cpu_times()
    busy = sum(getattr(b, f) - getattr(a, f) for f in ("user", "nice", "system", "irq",
               "softirq", "steal"))  # fmt: skip
    total = busy + (b.idle - a.idle) + (b.iowait - a.iowait)
    return 100 * (psutil.cpu_count() or 1) * busy / total if total else 0.0


def wait_machine_quiet(max_s: float, below_pct: float) -> dict[str, float]:
    """Before a phase (our server idle by then): wait until the rest of the machine uses
    less than `below_pct` of a core, at most `max_s`. Other people's jobs on a shared
    machine take CPU from the server and the generator alike."""
    started = time.monotonic()
    busy = machine_busy(1.0)
    while busy >= below_pct and time.monotonic() - started < max_s:
        busy = machine_busy(1.0)
    return {"machine_wait_s": time.monotonic() - started, "machine_cpu_before_pct": busy}
