"""A QoS 1 MQTT load generator in its own process, and the remote control a test uses.

Why a process: the server, the generator and the test share the machine's CPUs; a
generator on the test's own thread would slow both down and blur what is measured.
Why raw bytes on asyncio Protocols, no client library: a message must cost the
generator a few microseconds, and nothing may queue where we cannot see it. The bytes
are built here (with `mqtt_helpers`), not with the server's own codec.

Every message is a QoS 1 PUBLISH to `v1/devices/me/telemetry` of
`{"ts": T0 + n, "values": {"seq": SEQ_BASE + index * SEQ_SPAN + n}}`, where `n` counts
that connection's messages: a unique sequence number that storage can be checked for.
PUBACKs come in order, so the acknowledged messages of a connection are exactly
n = 0 .. acked - 1 (the generator checks the order).

Phases (one command each, over stdin; figures come back as JSON lines on stdout):
    closed  closed loop: every connection keeps `window` messages unacknowledged
            (capacity: the acked rate of a saturated server)
    open    open loop: `rate` messages/s dealt round-robin over the connections; a
            message whose connection is paused (its socket's write buffer is full,
            `pause_writing`) or has `window` messages unacknowledged is not sent but
            counted (`unsent`, by reason): the generator never buffers without bound
    stop    DISCONNECT everything and exit
After a phase the generator stops sending and waits (at most `drain_s`) for the acks
still owed, then holds the connections open until the next command.

Resource handling: every wait is bounded (`COMMAND_TIMEOUT_S` without a command ends
the process); the parent stops the process by its PID if it does not exit.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from tests.integration.mqtt_helpers import V5, connect_packet, publish_packet

TOPIC = "v1/devices/me/telemetry"
T0 = 1_710_000_000_000  # device timestamps: T0 + n, unique per device
SEQ_BASE = 10_000_000_000  # keeps every sequence number 11 digits: one packet size
SEQ_SPAN = 10_000_000  # sequence numbers per connection
COMMAND_TIMEOUT_S = 180.0
CONNECT_TIMEOUT_S = 30.0
TICK_S = 0.005  # open loop: schedule granularity
HIGH_WATER = 16 * 1024  # bytes a transport buffers before pause_writing
SNDBUF = 32 * 1024  # kernel send buffer per socket (Linux doubles it); no autotuning
MAX_WINDOW = 60_000  # under the 65535 packet ids: an id is never reused while in flight
LATENCY_STRIDE = 16  # ack latency of one message in 16 is recorded
ROOT = Path(__file__).resolve().parents[2]

# v5 CONNACK property ids -> size of the value (-1: UTF-8 string, -2: string pair)
_PROPERTY_SIZES = {
    0x11: 4, 0x12: -1, 0x13: 2, 0x15: -1, 0x16: -1, 0x1A: -1, 0x1C: -1, 0x1F: -1,
    0x21: 2, 0x22: 2, 0x24: 1, 0x25: 1, 0x26: -2, 0x27: 4, 0x28: 1, 0x29: 1, 0x2A: 1,
}  # fmt: skip


def payload(index: int, n: int) -> bytes:
    """The telemetry of message `n` of connection `index` (always the same length)."""
    return b'{"ts":%d,"values":{"seq":%d}}' % (T0 + n, seq_of(index, n))


def seq_of(index: int, n: int) -> int:
    return SEQ_BASE + index * SEQ_SPAN + n


def _varint(data: bytes, at: int) -> tuple[int, int]:
    """(value, bytes used) of a variable byte integer at `at`; used -1 if incomplete."""
    value = 0
    for k in range(4):
        if at + k >= len(data):
            return 0, -1
        byte = data[at + k]
        value |= (byte & 0x7F) << (7 * k)
        if not byte & 0x80:
            return value, k + 1
    raise ValueError("malformed variable byte integer from the server")


def receive_maximum(connack_body: bytes) -> int:
    """The v5 CONNACK's receive maximum property (65535 when absent)."""
    length, used = _varint(connack_body, 2)
    at, end = 2 + used, 2 + used + length
    while at < end:
        prop = connack_body[at]
        size = _PROPERTY_SIZES[prop]
        at += 1
        if prop == 0x21:
            return int.from_bytes(connack_body[at : at + 2], "big")
        for _ in range(-size if size < 0 else 0):  # strings: 2-byte length + bytes
            at += 2 + int.from_bytes(connack_body[at : at + 2], "big")
        at += max(size, 0)
    return 65535


# -- the generator (child process) --------------------------------------------------------


class Conn(asyncio.Protocol):
    """One device's MQTT connection."""

    def __init__(self, gen: Generator, index: int, client_id: str, token: str, version: int):
        self.gen = gen
        self.index = index
        self.version = version
        self.connect = connect_packet(client_id, version=version, username=token, keepalive=0)
        whole = publish_packet(TOPIC, payload(index, 0), version=version, qos=1, packet_id=1)
        self.head = whole[: len(whole) - len(payload(index, 0)) - (3 if version == V5 else 2)]
        self.props = b"\x00" if version == V5 else b""
        self.window = 1
        self.server_window = 65535  # v5: the receive maximum the CONNACK granted
        self.transport: asyncio.Transport | None = None
        self.connack: asyncio.Future[int] = gen.loop.create_future()
        self.inflight: dict[int, tuple[int, float]] = {}  # packet id -> (n, sent at)
        self.n = 0  # next message number; also: messages written
        self.acked = 0
        self.next_ack = 0
        self.out_of_order = 0
        self.refused: list[int] = []  # reason codes >= 0x80 (v5)
        self.unknown_acks = 0
        self.server_disconnect: int | None = None  # reason code of a DISCONNECT (v5)
        self.paused = False
        self.pauses = 0
        self.closing = False
        self.lost = False  # the connection ended without our asking
        self.rest = b""
        self.out: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)
        transport.set_write_buffer_limits(high=HIGH_WATER)
        transport.write(self.connect)

    def data_received(self, data: bytes) -> None:
        if self.rest:
            data, self.rest = self.rest + data, b""
        n, i, acked = len(data), 0, 0
        gen, inflight = self.gen, self.inflight
        now = time.perf_counter()
        while i + 2 <= n:
            length, used = _varint(data, i + 1)
            if used < 0:
                break
            start, end = i + 1 + used, i + 1 + used + length
            if end > n:
                break
            first = data[i]
            if first == 0x40:  # PUBACK
                sent = inflight.pop(int.from_bytes(data[start : start + 2], "big"), None)
                code = data[start + 2] if length > 2 else 0
                if sent is None:
                    self.unknown_acks += 1
                elif code >= 0x80:
                    self.refused.append(code)
                else:
                    acked += 1
                    if sent[0] != self.next_ack:
                        self.out_of_order += 1
                    self.next_ack = sent[0] + 1
                    if gen.recording and not sent[0] % LATENCY_STRIDE:
                        gen.latencies.append(now - sent[1])
            elif first == 0x20 and not self.connack.done():  # CONNACK
                if self.version == V5:
                    self.server_window = receive_maximum(data[start:end])
                self.connack.set_result(data[start + 1])
            elif first == 0xE0:  # DISCONNECT from the server (v5 carries a reason)
                self.server_disconnect = data[start] if length else 0
            i = end
        if i < n:
            self.rest = data[i:]
        if acked:
            self.acked += acked
            gen.acked += acked
            if gen.closed_loop:
                self.fill()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.connack.done():
            self.connack.set_exception(ConnectionError("closed before CONNACK"))
        if not self.closing:
            self.lost = True

    def pause_writing(self) -> None:
        self.paused = True
        self.pauses += 1

    def resume_writing(self) -> None:
        self.paused = False

    @property
    def closed(self) -> bool:
        return self.lost or self.closing

    def queue(self, now: float) -> None:
        """Queue the next message (written by `flush`)."""
        n = self.n
        pid = n % 65535 + 1
        self.inflight[pid] = (n, now)
        self.out += (self.head, pid.to_bytes(2, "big"), self.props, payload(self.index, n))
        self.n = n + 1

    def flush(self) -> None:
        if self.out and self.transport is not None and not self.closed:
            self.transport.write(b"".join(self.out))
        self.out.clear()

    def fill(self) -> None:
        """Closed loop: top the window up."""
        if self.closed:
            return
        now = time.perf_counter()
        for _ in range(self.window - len(self.inflight)):
            self.queue(now)
        self.flush()

    def disconnect(self) -> None:
        if self.transport is not None and not self.closed:
            self.closing = True
            self.transport.write(b"\xe0\x00")
            self.transport.close()
        self.closing = True


class Generator:
    """The connections of one generator process and the phases they run."""

    def __init__(self, plan: dict[str, Any]) -> None:
        self.plan = plan
        self.loop = asyncio.get_running_loop()
        self.conns: list[Conn] = []
        self.closed_loop = False
        self.recording = False
        self.acked = 0
        self.latencies: list[float] = []

    async def connect_all(self) -> dict[str, Any]:
        started = time.monotonic()
        sem = asyncio.Semaphore(50)
        host, port = self.plan["host"], self.plan["port"]
        errors: list[str] = []

        async def one(conn: Conn) -> None:
            async with sem:
                try:
                    async with asyncio.timeout(CONNECT_TIMEOUT_S):
                        await self.loop.create_connection(lambda: conn, host, port)
                        code = await conn.connack
                except (OSError, TimeoutError, ConnectionError) as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                    return
                if code:
                    errors.append(f"CONNACK code {code}")

        for i, (client_id, token, version) in enumerate(self.plan["clients"]):
            self.conns.append(Conn(self, i, client_id, token, version))
        async with asyncio.TaskGroup() as tg:
            for conn in self.conns:
                tg.create_task(one(conn), name=f"connect-{conn.index}")
        return {
            "connected": sum(c.connack.done() and not c.closed for c in self.conns),
            "errors": errors[:5],
            "connect_s": time.monotonic() - started,
            "server_windows": sorted({c.server_window for c in self.conns}),
        }

    def _window(self, conn: Conn, window: int) -> int:
        """What the server allows (v5 receive maximum), what the phase asks, what ids allow."""
        return max(1, min(window, conn.server_window, MAX_WINDOW))

    async def _drain(self, drain_s: float) -> float:
        started = time.monotonic()
        while time.monotonic() - started < drain_s:
            if not any(c.inflight for c in self.conns if not c.closed):
                break
            await asyncio.sleep(0.02)
        return time.monotonic() - started

    async def closed(self, window: int, warmup_s: float, seconds: float, drain_s: float) -> Any:
        for c in self.conns:
            c.window = self._window(c, window)
        self.closed_loop = True
        for c in self.conns:
            c.fill()
        await asyncio.sleep(warmup_s)
        acked_a, sent_a = self.acked, self._written()
        t_a = time.monotonic()
        self.recording = True
        await asyncio.sleep(seconds)
        self.recording = False
        measured_s = time.monotonic() - t_a
        acked_b, sent_b = self.acked, self._written()
        self.closed_loop = False
        drained_s = await self._drain(drain_s)
        return {
            "window": window,
            "measured_s": measured_s,
            "acked": acked_b - acked_a,
            "written": sent_b - sent_a,
            "drain_s": drained_s,
            **self._totals(),
        }

    async def open(self, rate: float, window: int, seconds: float, drain_s: float) -> Any:
        for c in self.conns:
            c.window = self._window(c, window)
        conns, count = self.conns, len(self.conns)
        unsent = {"paused": 0, "window": 0, "closed": 0}
        acked_a, written_a, pauses_a = self.acked, self._written(), self._pauses()
        peak_buffered = 0
        peak_inflight = 0
        started = time.perf_counter()
        t_a = time.monotonic()
        issued, rr = 0, 0
        self.recording = True
        while (now := time.perf_counter()) - started < seconds:
            due = int(rate * (now - started)) - issued
            issued += due
            # Deal `due` round-robin: every connection gets `each`, the next `extra` one more.
            each, extra = divmod(due, count)
            for k in range(count if each else extra):
                c = conns[(rr + k) % count]
                share = each + (k < extra)
                if c.closed:
                    unsent["closed"] += share
                elif c.paused:
                    unsent["paused"] += share
                else:
                    fits = min(share, c.window - len(c.inflight))
                    unsent["window"] += share - max(fits, 0)
                    for _ in range(fits):
                        c.queue(now)
                    c.flush()
            rr = (rr + extra) % count
            buffered = sum(c.transport.get_write_buffer_size() for c in conns if c.transport)
            peak_buffered = max(peak_buffered, buffered)
            peak_inflight = max(peak_inflight, sum(len(c.inflight) for c in conns))
            await asyncio.sleep(TICK_S)
        self.recording = False
        measured_s = time.monotonic() - t_a
        acked_b, written_b = self.acked, self._written()
        drained_s = await self._drain(drain_s)
        return {
            "rate": rate,
            "window": window,
            "measured_s": measured_s,
            "offered": issued,
            "written": written_b - written_a,
            "acked": acked_b - acked_a,
            "acked_after_drain": self.acked - acked_a,
            "unsent": unsent,
            "pauses": self._pauses() - pauses_a,
            "peak_write_buffer_bytes": peak_buffered,
            "peak_inflight": peak_inflight,
            "drain_s": drained_s,
            **self._totals(),
        }

    def _written(self) -> int:
        return sum(c.n for c in self.conns)

    def _pauses(self) -> int:
        return sum(c.pauses for c in self.conns)

    def _totals(self) -> dict[str, Any]:
        """Figures over the whole run so far, and per connection for the storage check."""
        lat = sorted(self.latencies)
        self.latencies = []
        conns = self.conns
        return {
            "latency_ms": {
                "count": len(lat),
                "p50": 1000 * lat[len(lat) // 2] if lat else None,
                "p99": 1000 * lat[len(lat) * 99 // 100] if lat else None,
                "max": 1000 * lat[-1] if lat else None,
            },
            "unacked": sum(len(c.inflight) for c in conns),
            "lost": [c.index for c in conns if c.lost],
            "server_disconnects": [
                (c.index, c.server_disconnect) for c in conns if c.server_disconnect is not None
            ],
            "refused": sorted({code for c in conns for code in c.refused}),
            "refused_count": sum(len(c.refused) for c in conns),
            "out_of_order": sum(c.out_of_order for c in conns),
            "unknown_acks": sum(c.unknown_acks for c in conns),
            "per_conn": [[c.n, c.acked] for c in conns],
            "generator_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }

    def stop(self) -> None:
        for c in self.conns:
            c.disconnect()


def _emit(event: str, **figures: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **figures}) + "\n")
    sys.stdout.flush()


async def _serve() -> None:
    loop = asyncio.get_running_loop()
    commands = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(commands), sys.stdin)

    async def next_command() -> dict[str, Any]:
        async with asyncio.timeout(COMMAND_TIMEOUT_S):
            line = await commands.readline()
        if not line:
            return {"cmd": "stop"}  # the parent went away
        command: dict[str, Any] = json.loads(line)
        return command

    gen = Generator(await next_command())
    try:
        _emit("ready", **await gen.connect_all())
        while (cmd := await next_command())["cmd"] != "stop":
            args = {k: v for k, v in cmd.items() if k != "cmd"}
            if cmd["cmd"] == "closed":
                _emit("closed", **await gen.closed(**args))
            elif cmd["cmd"] == "open":
                _emit("open", **await gen.open(**args))
            else:
                raise ValueError(f"unknown command {cmd!r}")
    finally:
        gen.stop()
        await asyncio.sleep(0.2)  # let the DISCONNECTs and FINs go out
    _emit("stopped")


# -- the remote control (test process) ----------------------------------------------------


class LoadGenerator:
    """A generator process: send it commands, get its figures (every wait bounded)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self._lines: queue.Queue[bytes] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name="loadgen-stdout", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)

    def send(self, cmd: str, **args: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        self.proc.stdin.flush()

    def expect(self, event: str, timeout: float) -> dict[str, Any]:
        """The next event, which must be `event`."""
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"the load generator sent no {event!r} in {timeout}s") from None
        figures: dict[str, Any] = json.loads(line)
        assert figures.pop("event") == event, figures
        return figures

    def run(self, cmd: str, timeout: float, **args: Any) -> dict[str, Any]:
        self.send(cmd, **args)
        return self.expect(cmd, timeout)

    def stop(self) -> int:
        """Disconnect everything and end the process (by its PID if it hangs)."""
        if self.proc.poll() is None:
            with suppress(OSError):
                self.send("stop")
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._reader.join(5)
        return self.proc.returncode


@contextmanager
def load_generator(
    port: int, clients: list[tuple[str, str, int]], log_dir: Path
) -> Iterator[tuple[LoadGenerator, dict[str, Any]]]:
    """Start a generator process, connect `clients` (client id, token, MQTT version);
    yield it with its "ready" figures; stop it on exit."""
    log_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "tests.integration.mqtt_load"]
    with (log_dir / "loadgen.stderr").open("wb") as err:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, cwd=ROOT
        )
    with proc:
        gen = LoadGenerator(proc)
        try:
            gen.send("plan", host="127.0.0.1", port=port, clients=clients)
            yield gen, gen.expect("ready", CONNECT_TIMEOUT_S + 30)
        finally:
            gen.stop()


if __name__ == "__main__":
    asyncio.run(_serve())
