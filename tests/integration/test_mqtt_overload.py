"""Overload: twice the capacity for 30 s. RSS stays bounded, no PUBACKed message is
lost, clients see slowed acks, not drops.

One real `iotmesh run` and DEVICES devices on QoS 1 MQTT connections (one in V5_EVERY
v5, the others v3.1.1), driven by a generator process (`mqtt_load.py`). A closed loop first measures
the capacity (PUBACKs/s with every connection keeping WINDOW messages unacknowledged);
then the generator offers twice that rate, open loop, for 30 s. A v5 client keeps to
the server's receive maximum; a v3.1.1 client has no such limit, so only the server's
not reading its socket (TCP back-pressure) holds it back. What the generator cannot
write (its socket buffer is full, or its v5 window) it counts, never buffers.

Assertions are on counts, not timings: the machine's 2 CPUs are shared by the server,
the generator, the test (and whatever else runs), so rates vary from run to run.
"""

from __future__ import annotations

import itertools
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.integration.mqtt_helpers import (
    V5,
    V311,
    assert_no_errors_logged,
    device_client,
    mqtt_connections,
    new_device,
    points,
)
from tests.integration.mqtt_load import MAX_WINDOW, T0, load_generator, seq_of
from tests.integration.server import RunningServer

pytestmark = [pytest.mark.overload, pytest.mark.timeout(240)]

MB = 2**20
DEVICES = 100
# One connection in V5_EVERY is v5, the others v3.1.1. v5 clients cannot overload the
# server (they keep to its receive maximum, so they just wait); v3.1.1 ones can, and
# they get 4/5 of the offered load: 1.6 times the capacity on them alone.
V5_EVERY = 5
# Capacity phase: unacked messages per connection (v5 ones: at most the receive maximum
# the server grants, 64 by default). Measured here, 64 on every connection gave ~55% of
# the acked rate of 256 on the v3.1.1 ones, and 1024 no more than 256.
WINDOW = 256
CAPACITY_WARMUP_S = 1.0
CAPACITY_S = 5.0
OVERLOAD = 2.0  # times the measured capacity
OVERLOAD_S = 30.0
DRAIN_S = 30.0  # after a phase: longest wait for the acks still owed
SAMPLE_S = 0.5  # RSS sampling period
FULL_CHECK = 10  # devices whose every stored point is compared; the others by count/sum
# The server (with its SQLite writer process) may grow this much over its RSS with every
# client connected and idle. What it holds is bounded by design: per connection, at
# most `mqtt.receive_maximum` (64) parsed QoS 1 messages, then it stops between two
# packets and leaves the rest of the socket read (<= 128 KiB with the default
# `mqtt.socket_receive_buffer`) unparsed; the writer process holds its batch, SQLite's
# 64 MiB page cache and its mapped file. Measured: +104 to +113 MB (main process ~100
# MB); +270 to +300 MB (main ~200 MB) when a v3.1.1 connection still had every message
# of a read (up to 256 KiB, ~3,300 of them) parsed and in flight. Keeping the excess
# instead (~200k messages/s here) would take ~500 MB as raw bytes and gigabytes as
# parsed messages; and if the server kept reading, no v3.1.1 socket would fill up
# (`unsent["paused"]` would stay 0).
RSS_BOUND_MB = 600
# Acked rate under overload over the closed-loop rate. Measured 0.91-1.07 (0.78-0.96
# with a read's every message in flight; see the reports); a stall or a collapse would
# bring it near 0.
MIN_SHARE_OF_CAPACITY = 0.25


class RssSampler:
    """Samples the RSS of a process and its children every SAMPLE_S, by phase.

    Each sample: (phase, RSS of the main process, RSS of the tree, anonymous RSS of
    the tree) in MB; "anonymous" leaves out file-backed pages (SQLite maps its file).
    """

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.samples: list[tuple[str, float, float, float]] = []
        self.phase = "idle"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            main = self.process.memory_info()
            total, shared = main.rss, main.shared
            for child in self.process.children(recursive=True):
                try:
                    info = child.memory_info()
                except psutil.NoSuchProcess:
                    continue
                total += info.rss
                shared += info.shared
            self.samples.append((self.phase, main.rss / MB, total / MB, (total - shared) / MB))
            self._stop.wait(SAMPLE_S)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def peak(self, phase: str, which: int = 2) -> float:
        """Peak RSS of a phase: which=1 main process, 2 tree, 3 anonymous of the tree."""
        return max(float(sample[which]) for sample in self.samples if sample[0] == phase)

    def thirds(self, phase: str) -> tuple[int, int, int]:
        """Peak tree RSS of each third of a phase (whether it kept growing)."""
        s = [sample[2] for sample in self.samples if sample[0] == phase]
        k = max(1, len(s) // 3)
        return round(max(s[:k])), round(max(s[k:-k] or s)), round(max(s[-k:]))


def _aggregate(admin: httpx.Client, device_id: str, agg: str, first: int, last: int) -> int:
    """COUNT or SUM of the device's `seq` points with ts in [first, last] (one or two
    buckets, whatever their alignment)."""
    r = admin.get(
        f"/api/v1/devices/{device_id}/telemetry",
        params={
            "keys": "seq",
            "start_ts": first,
            "end_ts": last,
            "agg": agg,
            "interval_ms": last - first + 1,
            "limit": 10,
        },
    )
    assert r.status_code == 200, r.text
    return sum(int(p["value"]) for p in r.json().get("seq", []))


def _all_points(admin: httpx.Client, device_id: str, written: int) -> dict[int, int]:
    """The device's stored `seq` points as {message number: value}."""
    found: dict[int, int] = {}
    start = T0
    for _ in range(100):  # pages of 100k points: bounded
        r = admin.get(
            f"/api/v1/devices/{device_id}/telemetry",
            params={
                "keys": "seq",
                "start_ts": start,
                "end_ts": T0 + written + 1000,
                "order": "ASC",
                "limit": 100_000,
            },
        )
        assert r.status_code == 200, r.text
        page = r.json().get("seq", [])
        found.update((p["ts"] - T0, int(p["value"])) for p in page)
        if len(page) < 100_000:
            return found
        start = page[-1]["ts"] + 1
    raise AssertionError("more than 10M points stored for one device")


def _check_storage(
    server: RunningServer, devices: list[dict[str, Any]], per_conn: list[list[int]]
) -> int:
    """Every acknowledged message (numbers 0 .. acked-1 of its connection: acks come in
    order) is stored with its sequence number, and nothing that was never written.

    Every device: COUNT and SUM over its acknowledged range, and COUNT over everything
    (points have unique timestamps, so the counts pin down the set). FULL_CHECK
    devices: every point. Returns the number of points stored.
    """
    sample = set(range(0, len(devices), max(1, len(devices) // FULL_CHECK)))

    def one(i: int) -> tuple[int, str | None]:
        device_id = devices[i]["id"]
        written, acked = per_conn[i]
        with server.admin() as admin:
            total = _aggregate(admin, device_id, "COUNT", T0 - 10**6, T0 + 10**9)
            if total > written:
                return total, f"{total} points stored, only {written} messages written"
            if acked:
                last = T0 + acked - 1
                count = _aggregate(admin, device_id, "COUNT", T0, last)
                want = sum(seq_of(i, n) for n in range(acked))
                got = _aggregate(admin, device_id, "SUM", T0, last)
                if count != acked or got != want:
                    return total, f"{acked} acked; stored {count}, sum {got} (want {want})"
            if i in sample:
                stored = _all_points(admin, device_id, written)
                missing = [n for n in range(acked) if stored.get(n) != seq_of(i, n)]
                extra = [n for n in stored if not 0 <= n < written]
                if missing or extra:
                    return total, f"missing {missing[:5]}, never written {extra[:5]}"
        return total, None

    with ThreadPoolExecutor(4, thread_name_prefix="storage-check") as pool:
        results = list(pool.map(one, range(len(devices))))
    bad = {i: problem for i, (_, problem) in enumerate(results) if problem}
    assert not bad, f"{len(bad)} devices lost or invented data, e.g. {list(bad.items())[:3]}"
    return sum(total for total, _ in results)


def _assert_no_drops(figures: dict[str, Any], phase: str) -> None:
    """Nobody was disconnected or refused, and acks came in order."""
    assert not figures["lost"], f"{phase}: the server closed connections {figures['lost'][:10]}"
    assert not figures["server_disconnects"], f"{phase}: {figures['server_disconnects'][:10]}"
    assert not figures["refused_count"], f"{phase}: PUBACK reason codes {figures['refused']}"
    assert not figures["out_of_order"], f"{phase}: PUBACKs out of order"
    assert not figures["unknown_acks"], f"{phase}: PUBACKs for packet ids not in flight"
    # Everything written was acknowledged within DRAIN_S of the end: slow, not dropped.
    assert not figures["unacked"], f"{phase}: {figures['unacked']} messages never acknowledged"


_names = itertools.count()


def test_twice_capacity_for_30s_slows_acks_and_loses_nothing(
    server: RunningServer, tmp_path: Path
) -> None:
    with server.admin() as admin:
        devices = [new_device(admin, f"overload-{next(_names)}") for _ in range(DEVICES)]
    clients = [
        (f"overload-{i}", d["access_token"], V5 if i % V5_EVERY == 0 else V311)
        for i, d in enumerate(devices)
    ]
    with (
        load_generator(server.mqtt_port, clients, tmp_path / "loadgen") as (gen, ready),
        RssSampler(server.pid) as rss,
    ):
        assert ready["connected"] == DEVICES, ready
        assert mqtt_connections(server) == DEVICES
        time.sleep(3 * SAMPLE_S)
        baseline = rss.peak("idle")

        rss.phase = "capacity"
        capacity = gen.run(
            "closed",
            CAPACITY_WARMUP_S + CAPACITY_S + DRAIN_S + 30,
            window=WINDOW,
            warmup_s=CAPACITY_WARMUP_S,
            seconds=CAPACITY_S,
            drain_s=DRAIN_S,
        )
        _assert_no_drops(capacity, "capacity")
        cap_rate = capacity["acked"] / capacity["measured_s"]
        assert cap_rate > 0

        rss.phase = "overload"
        over = gen.run(
            "open",
            OVERLOAD_S + DRAIN_S + 30,
            rate=OVERLOAD * cap_rate,
            window=MAX_WINDOW,  # v3.1.1: no window; v5: the server's receive maximum
            seconds=OVERLOAD_S,
            drain_s=DRAIN_S,
        )
        rss.phase = "after"
        acked_rate = over["acked"] / over["measured_s"]
        report = {
            "capacity_acked_per_s": round(cap_rate),
            "capacity_latency_ms": capacity["latency_ms"],
            "offered": over["offered"],
            "offered_per_s": round(over["offered"] / over["measured_s"]),
            "written": over["written"],
            "unsent": over["unsent"],
            "acked_in_30s": over["acked"],
            "acked_per_s": round(acked_rate),
            "acked_share_of_capacity": round(acked_rate / cap_rate, 2),
            "drain_s": round(over["drain_s"], 1),
            "overload_latency_ms": over["latency_ms"],
            "generator_pauses": over["pauses"],
            "generator_peak_inflight": over["peak_inflight"],
            "generator_peak_write_buffer_kb": over["peak_write_buffer_bytes"] // 1024,
            "rss_baseline_mb": round(baseline),
            "rss_baseline_anon_mb": round(rss.peak("idle", 3)),
            "rss_peak_capacity_mb": round(rss.peak("capacity")),
            "rss_peak_overload_mb": round(rss.peak("overload")),
            "rss_peak_overload_anon_mb": round(rss.peak("overload", 3)),
            "rss_peak_overload_main_mb": round(rss.peak("overload", 1)),
            "rss_overload_thirds_mb": rss.thirds("overload"),
        }
        print("\noverload figures:", report)

        # Slowed acks, not drops: no refusal, no disconnect, every written message acked.
        _assert_no_drops(over, "overload")
        assert mqtt_connections(server) == DEVICES  # the server's view: nobody left
        # Back-pressure: the server took less than it was offered, through both paths:
        # v5 clients found their receive maximum full, v3.1.1 clients their socket.
        assert over["written"] < over["offered"], report
        assert over["unsent"]["window"] > 0, report
        assert over["unsent"]["paused"] > 0, report
        assert not over["unsent"]["closed"], report
        # ...while it kept acknowledging a fair share of its capacity (no stall).
        assert acked_rate > MIN_SHARE_OF_CAPACITY * cap_rate, report
        # Memory: bounded.
        assert rss.peak("overload") < baseline + RSS_BOUND_MB, report

        # Still connected (so nothing is cut short): every PUBACKed message is stored.
        stored = _check_storage(server, devices, over["per_conn"])
        written = sum(w for w, _ in over["per_conn"])
        assert stored == written, (stored, written)  # every written message was acked
        print("stored:", stored)

    # Healthy afterwards: health check, and a new client's message is acked and stored.
    assert httpx.get(server.url + "/healthz", timeout=10).status_code == 200
    with device_client(server.mqtt_port, devices[1]["access_token"], V5) as client:
        message = {"ts": T0 - 1, "values": {"after": 1}}
        assert client.publish("v1/devices/me/telemetry", message).value == 0
    with server.admin() as admin:
        assert points(admin, devices[1]["id"], "after") == [{"ts": T0 - 1, "value": 1}]
    assert_no_errors_logged(server)
