"""Benchmark of the sans-IO MQTT codec on one core.

Run: `.venv/bin/python bench/mqtt_codec.py` (a few seconds; `--help` for the knobs).
Prints a table and writes bench/results/mqtt_codec.json.

1. Decode: a stream of `--count` QoS 1 PUBLISH packets (topic v1/devices/me/telemetry,
   a ~60-byte JSON payload, distinct packet ids), for v3.1.1 and for v5 (no properties,
   and with a Topic Alias + one User Property), concatenated and fed to `MqttReader` in
   64 KiB chunks, as a socket read loop would; every packet is drained after each chunk,
   with `read_packets()` (one call per chunk) and with `next_packet()` (one per packet).
   The CONNECT that opens the stream is outside the timing; slicing the stream is too.
2. Encode: `--count` PUBACKs (v3.1.1 and v5 short form), and the same QoS 1 PUBLISH
   packets, with `encode`.
Each figure is the best of `--repeat` runs (least disturbed by other processes). The
garbage collector stays on; the benchmark's own data is `gc.freeze()`-d first, as a
server's start-up state would be, or full collections would rescan 100k prepared packets
and measure that instead of the codec.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from iotmesh.proto.mqtt import Connect, MqttReader, Properties, Puback, Publish, encode

RESULTS = Path(__file__).parent / "results" / "mqtt_codec.json"
TOPIC = "v1/devices/me/telemetry"
CHUNK = 64 * 1024


def payload(i: int) -> bytes:
    body = f'{{"temperature":{20 + i % 10}.5,"humidity":{40 + i % 50},"seq":{i:08d}}}'
    return body.encode()


def publishes(count: int, props: bool) -> list[Publish]:
    out = []
    for i in range(count):
        p = Properties(topic_alias=1, user_properties=[("src", "bench")]) if props else None
        out.append(Publish(TOPIC, payload(i), 1, False, False, i % 65535 + 1, p or Properties()))
    return out


def best(repeat: int, run: Callable[[], int]) -> float:
    """Best wall time of `repeat` runs; `run` returns how many items it handled."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def stream_of(version: int, packets: list[Publish]) -> bytes:
    return b"".join(encode(p, version) for p in packets)


def decode_case(
    version: int, stream: bytes, count: int, repeat: int, drain: bool
) -> dict[str, Any]:
    connect = encode(Connect(protocol_level=version, client_id="bench"), version)
    chunks = [stream[i : i + CHUNK] for i in range(0, len(stream), CHUNK)]

    def run() -> int:
        reader = MqttReader(1 << 20)
        reader.feed(connect)
        reader.next_packet()
        n = 0
        for chunk in chunks:
            reader.feed(chunk)
            if drain:
                while batch := reader.read_packets():
                    n += len(batch)
            else:
                while reader.next_packet() is not None:
                    n += 1
        assert n == count, n
        return n

    seconds = best(repeat, run)
    return {
        "seconds": seconds,
        "per_second": count / seconds,
        "bytes": len(stream),
        "mb_per_second": len(stream) / seconds / 1e6,
    }


def encode_case(version: int, packets: list[Any], repeat: int) -> dict[str, Any]:
    def run() -> int:
        for p in packets:
            encode(p, version)
        return len(packets)

    seconds = best(repeat, run)
    return {"seconds": seconds, "per_second": len(packets) / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    count, repeat = args.count, args.repeat

    v4 = stream_of(4, publishes(count, props=False))
    v5 = stream_of(5, publishes(count, props=False))
    v5_props = stream_of(5, publishes(count, props=True))
    # GC stays on, as in the server; what exists now is frozen, as a server would after
    # start-up, so full collections do not rescan the benchmark's own data.
    gc.collect()
    gc.freeze()
    rows: list[tuple[str, dict[str, Any]]] = [
        ("decode PUBLISH QoS1 v3.1.1, read_packets", decode_case(4, v4, count, repeat, True)),
        ("decode PUBLISH QoS1 v5, read_packets", decode_case(5, v5, count, repeat, True)),
        ("decode ... v5 + alias, user prop", decode_case(5, v5_props, count, repeat, True)),
        ("decode PUBLISH QoS1 v3.1.1, next_packet", decode_case(4, v4, count, repeat, False)),
        ("decode PUBLISH QoS1 v5, next_packet", decode_case(5, v5, count, repeat, False)),
    ]
    plain = publishes(count, props=False)
    acks = [Puback(i % 65535 + 1) for i in range(count)]
    gc.freeze()
    rows += [
        ("encode PUBACK v3.1.1", encode_case(4, acks, repeat)),
        ("encode PUBACK v5", encode_case(5, acks, repeat)),
        ("encode PUBLISH QoS1 v3.1.1", encode_case(4, plain, repeat)),
        ("encode PUBLISH QoS1 v5", encode_case(5, plain, repeat)),
    ]

    table = Table(title=f"MQTT codec, {count:,} packets, best of {repeat}")
    table.add_column("case")
    table.add_column("packets/s", justify="right")
    table.add_column("µs/packet", justify="right")
    table.add_column("MB/s", justify="right")
    for name, r in rows:
        mbs = f"{r['mb_per_second']:.1f}" if "mb_per_second" in r else ""
        table.add_row(name, f"{r['per_second']:,.0f}", f"{1e6 / r['per_second']:.2f}", mbs)
    Console().print(table)

    RESULTS.parent.mkdir(exist_ok=True)
    result = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "count": count,
        "repeat": repeat,
        "cases": dict(rows),
    }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
