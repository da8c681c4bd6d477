"""The time-series backend stops for 30 s during ingest and starts again.

For InfluxDB (a private influxd, `tests/influxd.py`) and PostgreSQL (a private cluster,
`tests/pgcluster.py`; never the machine's shared server): `iotmesh run` stores
telemetry there while devices keep publishing over MQTT (paho, QoS 1), HTTP (httpx)
and CoAP (aiocoap, CON). The backend process is really stopped (influxd terminated,
`pg_ctl stop -m fast`), and after 30 s a new one starts on the same port and files.
Then the devices publish a few seconds more and stop, the writer drains, and:

- every acknowledged message (PUBACK, 200, 2.04) is stored (read back over REST);
  a message refused with 503 / 5.03 is not;
- devices saw back-pressure while the backend was down: a message sent while the
  writer was failing is acknowledged only after the backend is back (slowed acks), or
  refused with 503 / 5.03 (with Retry-After / Max-Age);
- /healthz showed the writer failing during the outage and everything healthy after;
- the same `iotmesh run` process (PID) served before and after: no restart needed.

Every device meets one of the two; two late devices (HTTP, CoAP) first publish once
the writer is failing, when the queues are full for sure, and must be refused (MQTT
never is: it waits for room, and its acks come late). The settings shrink the queues
(bus, writer) so that they fill within the outage; the behaviour is the defaults',
only sooner. Nothing here asserts
a duration: "slowed" is judged by the order of events (sent while failing, acked
after the restart).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiocoap.numbers.codes import Code

from tests.influxd import InfluxServer
from tests.integration.coap_helpers import aiocoap_client, request
from tests.integration.mqtt_helpers import V311, PahoClient, wait_until
from tests.integration.server import RunningServer, start_server
from tests.pgcluster import PgCluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

OUTAGE_S = 30.0
BEFORE_S = 3.0
AFTER_S = 4.0
TS0 = 1_720_000_000_000
MAX_MESSAGES = 4000  # per publisher: bounds every loop in count as well as time
MQTT_INTERVAL_S = 0.02
HTTP_INTERVAL_S = 0.05
COAP_INTERVAL_S = 0.05
REQUEST_TIMEOUT_S = 90.0  # longer than the outage: an upload may wait all of it
SMALL_QUEUES = {
    "IOTMESH_WRITER__RETRY_BACKOFF_MAX_S": "0.5",
    "IOTMESH_WRITER__MAX_PENDING_RECORDS": "8",
    "IOTMESH_BUS__PARTITIONS": "1",
    "IOTMESH_BUS__PARTITION_QUEUE": "4",
    "IOTMESH_BUS__MAX_BATCH": "4",
    "IOTMESH_HTTP__ENQUEUE_TIMEOUT_S": "1",
    "IOTMESH_COAP__ENQUEUE_TIMEOUT_S": "1",
}

# Phases, in order; a message records the phase it was sent in and the one its
# outcome came in.
BEFORE, DOWN, FAILING, RESTARTING, AFTER, DRAINING = range(6)
PHASE_NAMES = ["before", "down", "failing", "restarting", "after", "draining"]


class Clock:
    """The test's phase, read by every publisher thread."""

    def __init__(self) -> None:
        self.phase = BEFORE
        self.stop = threading.Event()

    def enter(self, phase: int) -> None:
        self.phase = phase


@dataclass
class Sent:
    """One message: its sequence number and what became of it."""

    n: int
    phase: int
    outcome: str = "pending"  # acked, refused, error, pending
    done_phase: int | None = None
    detail: str = ""


@dataclass
class Device:
    transport: str
    name: str
    start_phase: int = BEFORE  # a late device starts once the writer is failing
    token: str = ""
    id: str = ""
    sent: list[Sent] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def acked(self) -> set[int]:
        return {s.n for s in self.sent if s.outcome == "acked"}

    def refused(self) -> set[int]:
        return {s.n for s in self.sent if s.outcome == "refused"}

    def pushed_back(self) -> list[Sent]:
        """Messages that met back-pressure: refused, or sent before the backend came
        back and acknowledged only once it was back (a slow host may send a device's
        one pending upload just before the stop: it then waits through the outage)."""
        return [
            s
            for s in self.sent
            if s.outcome == "refused"
            or (
                s.outcome == "acked"
                and s.phase < RESTARTING
                and s.done_phase is not None
                and s.done_phase >= RESTARTING
            )
        ]


def payload(n: int) -> dict[str, Any]:
    return {"ts": TS0 + n, "values": {"seq": n}}


# -- publishers (each on a thread of its own, bounded in count and time) -----------------


class TimedMqtt(PahoClient):
    """A paho client that notes the phase each PUBACK arrived in.

    paho calls `on_publish` holding a lock that `publish` takes too, so no lock of ours
    may be held across `publish`: a PUBACK may come before its mid is registered, and
    is then kept until it is (`_early`)."""

    def __init__(self, clock: Clock, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.clock = clock
        self._lock = threading.Lock()
        self._by_mid: dict[int, Sent] = {}
        self._early: dict[int, int] = {}

    def _on_publish(self, client: Any, userdata: Any, mid: int, rc: Any, props: Any) -> None:
        with self._lock:
            sent = self._by_mid.pop(mid, None)
            if sent is None:
                self._early[mid] = self.clock.phase
            else:
                sent.outcome, sent.done_phase = "acked", self.clock.phase
        super()._on_publish(client, userdata, mid, rc, props)

    def send(self, sent: Sent) -> None:
        n = sent.n
        mid = self.publish_nowait(
            "v1/devices/me/telemetry", f'{{"ts":{TS0 + n},"values":{{"seq":{n}}}}}'
        )
        with self._lock:
            phase = self._early.pop(mid, None)
            if phase is None:
                self._by_mid[mid] = sent
            else:
                sent.outcome, sent.done_phase = "acked", phase


def wait_for_start(dev: Device, clock: Clock) -> None:
    while clock.phase < dev.start_phase and not clock.stop.wait(0.05):
        pass


def mqtt_publisher(srv: RunningServer, dev: Device, clock: Clock) -> None:
    wait_for_start(dev, clock)
    with TimedMqtt(clock, srv.mqtt_port, dev.token, version=V311, keepalive=120) as client:
        assert client.connect().value == 0
        for n in range(MAX_MESSAGES):
            if clock.stop.is_set():
                break
            sent = Sent(n, clock.phase)
            dev.sent.append(sent)
            client.send(sent)
            time.sleep(MQTT_INTERVAL_S)
        # Wait for the acks still owed (bounded), then disconnect cleanly.
        wait_until(
            lambda: all(s.outcome == "acked" for s in dev.sent) or client.disconnects,
            f"{dev.name}: PUBACKs of every message",
            timeout=60,
            interval=0.1,
        )
        if client.disconnects:
            dev.errors.append(f"disconnected: {client.disconnects}")


def http_publisher(srv: RunningServer, dev: Device, clock: Clock) -> None:
    wait_for_start(dev, clock)
    with httpx.Client(base_url=srv.url, timeout=REQUEST_TIMEOUT_S) as http:
        for n in range(MAX_MESSAGES):
            if clock.stop.is_set():
                break
            sent = Sent(n, clock.phase)
            dev.sent.append(sent)
            pause = HTTP_INTERVAL_S
            try:
                r = http.post(f"/api/v1/{dev.token}/telemetry", json=payload(n))
            except httpx.HTTPError as exc:
                sent.outcome, sent.detail = "error", repr(exc)
            else:
                if r.status_code == 200:
                    sent.outcome = "acked"
                elif r.status_code == 503:
                    sent.outcome, sent.detail = "refused", r.headers.get("retry-after", "")
                    # A well-behaved device waits as told (bounded: the test goes on).
                    pause = min(float(sent.detail or 1), 2.0)
                else:
                    sent.outcome, sent.detail = "error", f"{r.status_code} {r.text}"
            sent.done_phase = clock.phase
            time.sleep(pause)


def coap_publisher(srv: RunningServer, dev: Device, clock: Clock) -> None:
    wait_for_start(dev, clock)

    async def main() -> None:
        async with aiocoap_client() as context:
            for n in range(MAX_MESSAGES):
                if clock.stop.is_set():
                    break
                sent = Sent(n, clock.phase)
                dev.sent.append(sent)
                pause = COAP_INTERVAL_S
                body = f'{{"ts":{TS0 + n},"values":{{"seq":{n}}}}}'.encode()
                try:
                    response = await request(
                        context, srv, dev.token, "telemetry", payload=body,
                        timeout=REQUEST_TIMEOUT_S,
                    )  # fmt: skip
                except Exception as exc:  # recorded: the test looks at every outcome
                    sent.outcome, sent.detail = "error", repr(exc)
                else:
                    if response.code == Code.CHANGED:
                        sent.outcome = "acked"
                    elif response.code == Code.SERVICE_UNAVAILABLE:
                        sent.outcome, sent.detail = "refused", str(response.opt.max_age)
                        pause = min(float(response.opt.max_age or 1), 2.0)
                    else:
                        sent.outcome, sent.detail = "error", f"{response.code} {response.payload!r}"
                sent.done_phase = clock.phase
                await asyncio.sleep(pause)

    asyncio.run(main())


PUBLISHERS: dict[str, Callable[[RunningServer, Device, Clock], None]] = {
    "mqtt": mqtt_publisher,
    "http": http_publisher,
    "coap": coap_publisher,
}


# -- the scenario ------------------------------------------------------------------------


@dataclass
class Backend:
    """How the test stops and starts the backend, and the flags that select it."""

    args: list[str]
    stop: Callable[[], None]
    start: Callable[[], None]


def health(srv: RunningServer) -> tuple[int, dict[str, Any]]:
    r = httpx.get(srv.url + "/healthz", timeout=10)
    body: dict[str, Any] = r.json()
    return r.status_code, body


def writer_failing(srv: RunningServer) -> dict[str, Any] | None:
    status, body = health(srv)
    writer = body["services"]["writer"]
    if status == 503 and not writer["ok"] and "commits failing" in writer["detail"]:
        return body
    return None


def stored(admin: httpx.Client, dev: Device) -> set[int]:
    r = admin.get(
        f"/api/v1/devices/{dev.id}/telemetry",
        params={"keys": "seq", "start_ts": TS0, "end_ts": TS0 + MAX_MESSAGES, "limit": 100_000},
    )
    assert r.status_code == 200, r.text
    points = r.json().get("seq", [])
    assert all(p["ts"] == TS0 + p["value"] for p in points)
    return {p["value"] for p in points}


def summary(devices: list[Device]) -> str:
    lines = []
    for dev in devices:
        outcomes: dict[str, int] = {}
        for s in dev.sent:
            key = f"{s.outcome}@{PHASE_NAMES[s.phase]}->" + (
                PHASE_NAMES[s.done_phase] if s.done_phase is not None else "-"
            )
            outcomes[key] = outcomes.get(key, 0) + 1
        errors = [s.detail for s in dev.sent if s.outcome == "error"][:3]
        lines.append(f"{dev.name}: {len(dev.sent)} sent {outcomes} {errors} {dev.errors}")
    return "\n".join(lines)


def run_outage(srv: RunningServer, backend: Backend) -> None:
    devices = [Device(t, f"{t}-{i}") for t in ("mqtt", "http", "coap") for i in range(2)]
    devices.append(Device("http", "http-2"))
    # Devices that first publish during the outage, when the queues are full already
    # (the MQTT devices keep more messages in flight than the queues hold).
    late = [Device("http", "http-late", FAILING), Device("coap", "coap-late", FAILING)]
    devices += late
    with srv.admin() as admin:
        for dev in devices:
            r = admin.post("/api/v1/devices", json={"name": dev.name})
            assert r.status_code == 201, r.text
            dev.token, dev.id = r.json()["access_token"], r.json()["id"]
    assert health(srv)[0] == 200
    pid = srv.pid

    clock = Clock()
    failures: list[str] = []

    def guarded(fn: Callable[[RunningServer, Device, Clock], None], dev: Device) -> None:
        try:
            fn(srv, dev, clock)
        except BaseException as exc:  # reported by the test, not lost in the thread
            failures.append(f"{dev.name}: {exc!r}")

    threads = [
        threading.Thread(target=guarded, args=(PUBLISHERS[d.transport], d), name=d.name)
        for d in devices
    ]
    for thread in threads:
        thread.start()
    try:
        time.sleep(BEFORE_S)
        clock.enter(DOWN)
        stopped_at = time.monotonic()
        backend.stop()
        failing = wait_until(lambda: writer_failing(srv), "/healthz: writer failing", 20)
        clock.enter(FAILING)
        time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - stopped_at)))
        still_failing = writer_failing(srv)
        clock.enter(RESTARTING)
        backend.start()
        wait_until(lambda: health(srv)[0] == 200, "/healthz 200 after the restart", 60, 0.2)
        clock.enter(AFTER)
        time.sleep(AFTER_S)
    finally:
        clock.enter(DRAINING)
        clock.stop.set()
        deadline = time.monotonic() + REQUEST_TIMEOUT_S + 30
        for thread in threads:
            thread.join(max(0.1, deadline - time.monotonic()))
    assert not failures, failures
    alive = [t.name for t in threads if t.is_alive()]
    if alive:
        with srv.admin() as admin:
            stats = admin.get("/api/v1/stats").json()
        log = [line for line in srv.output().splitlines() if "retrying" not in line]
        pytest.fail(
            f"publishers still waiting: {alive}\n{summary(devices)}\n{health(srv)}\n"
            f"{stats}\n" + "\n".join(log[-40:])
        )

    # The writer drains; the same process serves.
    wait_until(
        lambda: (
            (h := health(srv))[0] == 200
            and h[1]["services"]["writer"]["detail"] == "0 records pending"
        ),
        "the writer drained",
        60,
        0.2,
    )
    assert srv.proc.poll() is None
    assert srv.pid == pid
    assert httpx.get(srv.url + "/livez", timeout=10).status_code == 200

    assert "commits failing" in failing["services"]["writer"]["detail"]
    assert still_failing is not None, "the writer recovered while the backend was down"

    report = []
    with srv.admin() as admin:
        for dev in devices:
            have = stored(admin, dev)
            lost = sorted(dev.acked() - have)
            assert not lost, f"{dev.name}: acknowledged but not stored: {lost[:20]}"
            kept = sorted(dev.refused() & have)
            assert not kept, f"{dev.name}: refused but stored anyway: {kept[:20]}"
            report.append(
                f"{dev.name}: sent {len(dev.sent)}, acked {len(dev.acked())}, "
                f"refused {len(dev.refused())}, pushed back {len(dev.pushed_back())}, "
                f"errors {[s.detail for s in dev.sent if s.outcome == 'error'][:3]} "
                f"{dev.errors}"
            )
    print("\n".join(report))

    for dev in devices:
        # Acknowledged only once stored: nothing sent while the writer was failing is
        # acknowledged before the backend was started again.
        early = [
            s.n
            for s in dev.sent
            if s.phase == FAILING and s.done_phase == FAILING and s.outcome == "acked"
        ]
        assert not early, f"{dev.name}: acknowledged while the backend was down: {early[:20]}"
        # Every publisher met back-pressure, and got going again after the restart.
        assert dev.pushed_back(), f"{dev.name}: no back-pressure seen:\n" + "\n".join(report)
        assert any(s.phase == AFTER and s.outcome == "acked" for s in dev.sent), (
            f"{dev.name}: nothing acknowledged after the restart:\n" + "\n".join(report)
        )
        assert not dev.errors, dev.errors
    # HTTP and CoAP devices are told to retry later once the queues are full.
    for dev in late:
        assert dev.refused(), f"{dev.name}: no refusal:\n" + "\n".join(report)
        assert all(
            s.detail.isdigit() and int(s.detail) >= 1 for s in dev.sent if s.outcome == "refused"
        )


def test_influxdb_outage(tmp_path: Path) -> None:
    influx = InfluxServer.start(tmp_path / "influxd")
    with ExitStack() as stack:
        stack.callback(influx.stop)
        args = ["--storage", "influxdb", "--influx-url", influx.url, "--influx-database", "outage"]
        srv = start_server(tmp_path / "data", tmp_path / "logs", *args, env=SMALL_QUEUES)
        stack.callback(srv.stop)
        run_outage(srv, Backend(args, influx.stop, influx.launch))
        assert "commit failed, retrying" in srv.output()


@pytest.fixture
def pg_cluster() -> Iterator[PgCluster]:
    try:
        cluster = PgCluster.create()
    except RuntimeError as exc:
        pytest.fail(f"cannot make a private PostgreSQL cluster: {exc}")
    try:
        yield cluster
    finally:
        cluster.destroy()


def test_postgres_outage(pg_cluster: PgCluster, tmp_path: Path) -> None:
    args = ["--storage", "postgres", "--postgres-url", pg_cluster.url, "--postgres-schema", "o"]
    srv = start_server(tmp_path / "data", tmp_path / "logs", *args, env=SMALL_QUEUES)
    try:
        run_outage(srv, Backend(args, pg_cluster.stop, pg_cluster.start))
        assert "commit failed, retrying" in srv.output()
    finally:
        srv.stop()
