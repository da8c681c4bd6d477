"""The MQTT load generator behind bench/mqtt_ingest.py: worker processes, each driving
its share of the connections on raw asyncio Protocols with pre-encoded packets.

No MQTT client library: a PUBLISH is a pre-encoded head (fixed header, topic) + a
pre-built packet id + one of `POOL` pre-built payloads, joined once per socket write;
a PUBACK is recognised by its first byte. That keeps the generator's cost per message
to a few microseconds, because it shares the machine's CPUs with the server it loads.

Modes (`Job.mode`):
    qos1  closed loop: each connection keeps `window` PUBLISHes unacknowledged and sends
          the next one when a PUBACK comes. With `rate` > 0, open loop instead: a ticker
          issues `rate` messages/s round-robin over the connections that have room in
          their window; what finds no room is dropped from the schedule and counted
          (`skipped`), never caught up in a burst.
    qos0  flood: every connection writes `window` messages per pass while its transport
          is not paused (the transport's high-water mark and a small SO_SNDBUF bound
          what waits in buffers).
    idle  connect and hold until told to stop; keep-alive `keep_alive` (0: none).

Timeline: connect everything -> report "ready" -> wait for `go` -> at `start_at` begin
sending -> warm-up `warmup_s` -> measure `seconds` (counters snapshotted at both ends,
latencies recorded only inside) -> stop sending, wait up to `drain_s` for acks and
buffers -> report "result" -> hold the connections until `stop` (so that the caller can
check storage before anything is cancelled by a disconnect) -> DISCONNECT, close.
Every wait is bounded (`hold_s`, `connect_timeout_s`, `GO_TIMEOUT_S`).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import os
import resource
import socket
import time
from dataclasses import dataclass, field
from multiprocessing.queues import Queue
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event
from typing import Any

from iotmesh.proto.mqtt import Connect, Disconnect, Publish, Subscribe, Subscription, encode

TOPIC = "v1/devices/me/telemetry"
VERSION = 4  # MQTT 3.1.1: the fixed 4-byte PUBACK (no reason code or properties)
POOL = 1024  # distinct payloads, used round-robin
PIDS = tuple(i.to_bytes(2, "big") for i in range(65536))
DISCONNECT = encode(Disconnect(), VERSION)
MAX_LATENCIES = 4_000_000  # per worker: 32 MB of doubles at most
GO_TIMEOUT_S = 120.0
TICK_S = 0.002  # rate-limited mode: schedule granularity
MAX_CARRY_S = 0.05  # rate-limited mode: schedule debt kept when windows are full
QOS0_HIGH_WATER = 4096  # bytes a QoS 0 transport buffers before pause_writing
QOS0_SNDBUF = 32 * 1024  # kernel send buffer of a QoS 0 socket (Linux doubles it)


def payload(i: int) -> bytes:
    """Telemetry of 3 keys; every body has the same length, so every PUBLISH the
    Mosquitto subscriber gets has the same size and it can count messages by bytes."""
    return b'{"temperature":%d.%d,"humidity":%d.%d,"count":%d}' % (
        15 + i % 20,
        i % 10,
        30 + i % 50,
        (i * 7) % 10,
        10_000_000 + i % 10_000_000,
    )


def timed_payload(ts: int, seq: int) -> bytes:
    """The same telemetry with an explicit, unique device time, for checking storage:
    points at one ts overwrite each other (last write wins), server-time ones can."""
    return b'{"ts":%d,"values":{"temperature":21.5,"humidity":40.1,"count":%d}}' % (
        ts,
        10_000_000 + seq % 10_000_000,
    )


def qos0_packet(i: int) -> bytes:
    return encode(Publish(TOPIC, payload(i), 0), VERSION)


class Packets:
    """The pre-encoded packets: QoS 0 whole; QoS 1 as head + packet id + payload."""

    def __init__(self) -> None:
        self.qos0 = [qos0_packet(i) for i in range(POOL)]
        self.payloads = [payload(i) for i in range(POOL)]
        whole = [encode(Publish(TOPIC, p, 1, packet_id=0x0102), VERSION) for p in self.payloads]
        cut = len(whole[0]) - len(self.payloads[0]) - 2
        self.qos1_head = whole[0][:cut]
        for w in whole:  # same length payloads: one head for all; check the split
            assert w[:cut] == self.qos1_head, w
            assert w[cut : cut + 2] == b"\x01\x02", w
        self.qos0_size = len(self.qos0[0])
        self.qos1_size = len(whole[0])


@dataclass
class Job:
    """What one worker process does (pickled to it)."""

    worker: int
    host: str
    port: int
    clients: list[tuple[str, str | None]]  # (client id, user name or None: anonymous)
    mode: str  # "qos0" | "qos1" | "idle"
    window: int = 8
    rate: float = 0.0  # qos1 messages/s of this worker; 0: closed loop, as fast as acked
    warmup_s: float = 2.0
    seconds: float = 10.0
    drain_s: float = 3.0
    connect_timeout_s: float = 120.0
    connect_concurrency: int = 200
    keep_alive: int = 0
    hold_s: float = 180.0
    sample: dict[int, int] = field(default_factory=dict)  # client index -> ts base
    nice: int = 0  # added to the process's nice value: lets the server preempt the generator


class Client(asyncio.Protocol):
    """One MQTT connection of the generator."""

    def __init__(self, gen: Generator, index: int, connect: bytes, ts_base: int | None) -> None:
        self.gen = gen
        self.index = index
        self.connect_packet = connect
        self.ts_base = ts_base  # not None: a storage-check client (explicit ts payloads)
        self.transport: asyncio.Transport | None = None
        self.connack: asyncio.Future[int] = gen.loop.create_future()
        self.inflight: dict[int, float] = {}
        self.next_pid = 0
        self.seq = 0
        self.paused = False
        self.closing = False
        self.closed = False
        self.rest = b""
        self.out: list[bytes] = []
        self.written = 0  # PUBLISHes handed to the transport
        self.acked = 0
        self.pkt_size = 0  # bytes of one of its QoS 0 PUBLISHes (they are all one size)

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self.gen.job.mode == "qos0":
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, QOS0_SNDBUF)
            transport.set_write_buffer_limits(high=QOS0_HIGH_WATER)
        transport.write(self.connect_packet)

    def data_received(self, data: bytes) -> None:
        if self.rest:
            data = self.rest + data
            self.rest = b""
        n = len(data)
        i = 0
        acked = 0
        gen = self.gen
        inflight = self.inflight
        now = time.perf_counter()
        lat = gen.latencies if gen.recording else None
        while i + 2 <= n:
            first = data[i]
            length = data[i + 1]
            head = 2
            if length & 0x80:  # multi-byte remaining length: never for what we expect
                length, head = _varint(data, i + 1)
                if head < 0:
                    break
            end = i + head + length
            if end > n:
                break
            if first == 0x40:  # PUBACK
                sent_at = inflight.pop((data[i + 2] << 8) | data[i + 3], None)
                if sent_at is not None:
                    acked += 1
                    if lat is not None and len(lat) < MAX_LATENCIES:
                        lat.append(now - sent_at)
            elif first == 0x20 and not self.connack.done():  # CONNACK
                self.connack.set_result(data[i + 3])
            i = end
        if i < n:
            self.rest = data[i:]
        if acked:
            self.acked += acked
            gen.acked += acked
            if gen.closed_loop and gen.sending:
                self.fill()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.connack.done():
            self.connack.set_exception(ConnectionError("closed before CONNACK"))
        elif not self.closing:
            self.gen.lost += 1

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False

    # -- sending --------------------------------------------------------------------------

    def _pid(self) -> int:
        pid = self.next_pid % 65535 + 1
        self.next_pid = pid
        return pid

    def queue_qos1(self, now: float) -> None:
        """Queue one QoS 1 PUBLISH (written by `flush`)."""
        pid = self._pid()
        self.inflight[pid] = now
        if self.ts_base is None:
            gen = self.gen
            self.out += (gen.packets.qos1_head, PIDS[pid], gen.packets.payloads[self.seq % POOL])
        else:
            body = timed_payload(self.ts_base + self.seq, self.seq)
            self.out.append(encode(Publish(TOPIC, body, 1, packet_id=pid), VERSION))
        self.seq += 1
        self.written += 1

    def flush(self) -> None:
        if self.out and self.transport is not None and not self.closed:
            self.transport.write(b"".join(self.out))
        self.out.clear()

    def fill(self) -> None:
        """Closed loop: top the window up to `window` unacknowledged messages."""
        room = self.gen.job.window - len(self.inflight)
        if room <= 0 or self.closed:
            return
        now = time.perf_counter()
        for _ in range(room):
            self.queue_qos1(now)
        self.flush()

    def write_qos0(self, count: int) -> None:
        if self.ts_base is None:
            pool = self.gen.packets.qos0
            seq = self.seq
            data = b"".join([pool[(seq + k) % POOL] for k in range(count)])
        else:
            data = b"".join(
                [
                    encode(Publish(TOPIC, timed_payload(self.ts_base + s, s), 0), VERSION)
                    for s in range(self.seq, self.seq + count)
                ]
            )
        self.pkt_size = len(data) // count
        self.seq += count
        self.written += count
        assert self.transport is not None
        self.transport.write(data)

    def unsent(self) -> int:
        """QoS 0 messages still in the transport's buffer (not yet given to the kernel)."""
        if self.transport is None or not self.pkt_size:
            return 0
        return self.transport.get_write_buffer_size() // self.pkt_size

    def disconnect(self) -> None:
        self.closing = True
        if self.transport is not None and not self.closed:
            self.transport.write(DISCONNECT)
            self.transport.close()


def _varint(data: bytes, at: int) -> tuple[int, int]:
    """(remaining length, header size) of a fixed header whose length starts at `at`;
    header size -1 when the length is not complete yet."""
    value = 0
    for k in range(4):
        if at + k >= len(data):
            return 0, -1
        byte = data[at + k]
        value |= (byte & 0x7F) << (7 * k)
        if not byte & 0x80:
            return value, k + 2
    raise ValueError("malformed remaining length from the server")


class Generator:
    """One worker's connections and the phase they run."""

    def __init__(
        self, job: Job, events: Queue[Any], go: Event, stop: Event, start_at: Synchronized[float]
    ) -> None:
        self.job = job
        self.events = events
        self.go = go
        self.stop = stop
        self.start_at = start_at
        self.loop = asyncio.get_running_loop()
        self.packets = Packets()
        self.clients: list[Client] = []
        self.latencies = array.array("d")
        self.recording = False
        self.sending = False
        self.closed_loop = job.mode == "qos1" and not job.rate
        self.acked = 0
        self.lost = 0
        self.skipped = 0
        self.failed: list[str] = []

    # -- connecting -----------------------------------------------------------------------

    async def connect_all(self) -> None:
        job = self.job
        sem = asyncio.Semaphore(job.connect_concurrency)
        deadline = self.loop.time() + job.connect_timeout_s
        slots: list[Client | None] = [None] * len(job.clients)

        async def one(i: int, client_id: str, user: str | None) -> None:
            packet = encode(
                Connect(
                    protocol_level=VERSION,
                    client_id=client_id,
                    clean_start=True,
                    keep_alive=job.keep_alive,
                    username=user,
                ),
                VERSION,
            )
            async with sem:
                remaining = deadline - self.loop.time()
                if remaining <= 0:
                    self.failed.append("connect phase timed out")
                    return
                client = Client(self, i, packet, job.sample.get(i))
                try:
                    async with asyncio.timeout(min(remaining, 30.0)):
                        await self.loop.create_connection(lambda: client, job.host, job.port)
                        code = await client.connack
                except (OSError, TimeoutError, ConnectionError) as exc:
                    self.failed.append(f"{type(exc).__name__}: {exc}")
                    if client.transport is not None:
                        client.transport.abort()
                    return
                if code != 0:
                    self.failed.append(f"CONNACK return code {code}")
                    client.disconnect()
                    return
                slots[i] = client

        async with asyncio.TaskGroup() as tg:
            for i, (client_id, user) in enumerate(job.clients):
                tg.create_task(one(i, client_id, user), name=f"connect-{i}")
        self.clients = [c for c in slots if c is not None]

    # -- phases ---------------------------------------------------------------------------

    async def _sleep_until(self, t: float) -> None:
        delay = t - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)

    async def _flood(self) -> None:
        burst = self.job.window
        live = self.clients
        while self.sending:
            wrote = False
            for c in live:
                if not c.paused and not c.closed:
                    c.write_qos0(burst)
                    wrote = True
            await asyncio.sleep(0 if wrote else 0.001)

    async def _ticker(self) -> None:
        rate = self.job.rate
        window = self.job.window
        clients = self.clients
        n = len(clients)
        if not n:
            return
        started = time.perf_counter()
        issued = 0
        rr = 0
        while self.sending:
            await asyncio.sleep(TICK_S)
            now = time.perf_counter()
            due = int(rate * (now - started)) - issued
            touched: list[Client] = []
            misses = 0
            while due > 0 and misses < n:
                c = clients[rr]
                rr = rr + 1 if rr + 1 < n else 0
                if c.closed or c.paused or len(c.inflight) >= window:
                    misses += 1
                    continue
                misses = 0
                if not c.out:
                    touched.append(c)
                c.queue_qos1(now)
                due -= 1
                issued += 1
            for c in touched:
                c.flush()
            debt = due - int(rate * MAX_CARRY_S)
            if debt > 0:  # windows full: drop what is overdue instead of bursting later
                self.skipped += debt
                issued += debt

    def _sent_now(self) -> int:
        if self.job.mode == "qos0":
            return sum(c.written - c.unsent() for c in self.clients)
        return sum(c.written for c in self.clients)

    async def run_phase(self) -> dict[str, Any]:
        job = self.job
        t0 = self.start_at.value
        t_warm = t0 + job.warmup_s
        t_end = t_warm + job.seconds
        await self._sleep_until(t0)
        self.sending = True
        driver: asyncio.Task[None] | None = None
        if job.mode == "qos0":
            driver = asyncio.create_task(self._flood(), name="flood")
        elif job.rate:
            driver = asyncio.create_task(self._ticker(), name="ticker")
        else:
            for c in self.clients:
                c.fill()
        await self._sleep_until(t_warm)
        sent_a, acked_a, cpu_a = self._sent_now(), self.acked, time.process_time()
        lost_a = self.lost
        self.recording = True
        measured_from = time.monotonic()
        await self._sleep_until(t_end)
        self.recording = False
        measured_s = time.monotonic() - measured_from
        sent_b, acked_b, cpu_b = self._sent_now(), self.acked, time.process_time()
        self.sending = False
        if driver is not None:
            await driver
        drain_until = time.monotonic() + job.drain_s
        while time.monotonic() < drain_until:
            busy = any(c.inflight for c in self.clients if not c.closed) or any(
                c.transport is not None and c.transport.get_write_buffer_size()
                for c in self.clients
                if not c.closed
            )
            if not busy:
                break
            await asyncio.sleep(0.01)
        # Totals count every message handed to a transport: the connections stay open
        # until the caller has checked delivery, so what is still buffered goes out too.
        samples = {
            c.index: {"sent": c.written, "acked": c.acked, "unacked": len(c.inflight)}
            for c in self.clients
            if c.ts_base is not None
        }
        return {
            "sent": sent_b - sent_a,
            "acked": acked_b - acked_a,
            "measured_s": measured_s,
            "cpu_s": cpu_b - cpu_a,
            "lost_in_window": self.lost - lost_a,
            "lost": self.lost,
            "sent_total": sum(c.written for c in self.clients),
            "unsent_after_drain": sum(c.unsent() for c in self.clients),
            "acked_total": self.acked,
            "unacked_after_drain": sum(len(c.inflight) for c in self.clients),
            "skipped": self.skipped,
            "latencies": self.latencies.tobytes(),
            "samples": samples,
        }

    async def run(self) -> None:
        job = self.job
        started = time.monotonic()
        await self.connect_all()
        self.events.put(
            (
                "ready",
                job.worker,
                {
                    "connected": len(self.clients),
                    "failed": len(self.failed),
                    "errors": sorted(set(self.failed))[:5],
                    "connect_s": time.monotonic() - started,
                },
            )
        )
        go = await asyncio.to_thread(self.go.wait, GO_TIMEOUT_S)
        result: dict[str, Any] = {}
        try:
            if go and job.mode != "idle":
                result = await self.run_phase()
            self.events.put(("result", job.worker, result))
            await asyncio.to_thread(self.stop.wait, job.hold_s)
            result = {"lost": self.lost}
        finally:
            for c in self.clients:
                c.disconnect()
            await asyncio.sleep(0.2)  # let the DISCONNECTs and FINs go out
        self.events.put(("closed", job.worker, result))


def raise_nofile() -> tuple[int, int]:
    """Raise the soft open-files limit to the hard one; return (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def worker_main(
    job: Job, events: Queue[Any], go: Event, stop: Event, start_at: Synchronized[float]
) -> None:
    """Entry point of a generator process."""
    raise_nofile()
    if job.nice:
        os.nice(job.nice)

    async def main() -> None:
        await Generator(job, events, go, stop, start_at).run()

    try:
        asyncio.run(main())
    except BaseException as exc:
        events.put(("error", job.worker, f"{type(exc).__name__}: {exc}"))
        raise


def subscriber_main(
    host: str,
    port: int,
    received: Synchronized[int],
    ready: Event,
    stop: Event,
    max_s: float,
) -> None:
    """A QoS 0 subscriber on `#` that reads and counts bytes (Mosquitto's relaying work).

    Blocking socket, 1 MiB reads: it costs far less CPU than parsing would; all
    messages have one size, so the caller turns bytes into messages.
    """
    connect = encode(Connect(protocol_level=VERSION, client_id="bench-sub"), VERSION)
    subscribe = encode(Subscribe(1, [Subscription("#", 0)]), VERSION)
    deadline = time.monotonic() + max_s
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(connect + subscribe)
        head = b""
        while len(head) < 9:  # CONNACK (4 bytes) + SUBACK of one filter (5 bytes)
            chunk = sock.recv(9 - len(head))
            if not chunk:
                raise ConnectionError("subscriber: the broker closed the connection")
            head += chunk
        if head[0] != 0x20 or head[3] != 0 or head[4] != 0x90 or head[8] != 0:
            raise ConnectionError(f"subscriber: refused ({head.hex()})")
        ready.set()
        sock.settimeout(0.25)
        buf = bytearray(1 << 20)
        total = 0
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                n = sock.recv_into(buf)
            except TimeoutError:
                continue
            if not n:
                break
            total += n
            received.value = total
