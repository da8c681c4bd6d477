"""The table of bench/mqtt_ingest.py (rich) and its one-line progress summaries."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

TARGETS = {
    "qos1_ratio": 1.0,
    "qos1_msgs_per_s": 40_000,
    "half_rate_p99_ms": 20.0,
    "idle_rss_mb": 200.0,
}


def summary(phase: dict[str, Any]) -> str:
    text = (
        f"sent {phase.get('sent_msgs_per_s', 0):,.0f}/s, "
        f"acked {phase.get('acked_msgs_per_s', 0):,.0f}/s, "
        f"CPU server {phase.get('server_cpu_pct', 0):.0f}% "
        f"loadgen {phase.get('loadgen_cpu_pct', 0):.0f}% "
        f"other {phase.get('other_cpu_pct', 0):.0f}%"
    )
    if "server_main_cpu_pct" in phase:
        text += f" (main process {phase['server_main_cpu_pct']:.0f}%)"
    rates = phase.get("server_rates") or {}
    if rates.get("commits"):
        text += (
            f", {rates['commits']:,.0f} commits/s of "
            f"{rates.get('records', 0) / rates['commits']:,.0f} records, "
            f"{rates.get('commit_ms', 0) / rates['commits']:.1f} ms each"
        )
    if rates.get("loop_samples"):
        text += (
            f", event loop {rates['loop_lag_ms'] / rates['loop_samples']:.1f} ms late on "
            f"average, {rates.get('loop_stalls', 0):.1f}/s at least 100 ms late"
        )
    lat = phase.get("latency_ms")
    if lat:
        text += f", p50 {lat['p50']:.1f} ms, p99 {lat['p99']:.1f} ms"
    if "verify" in phase:
        v = phase["verify"]
        text += f", sample stored {v['stored']}/{v['sent']} sent ({v['acked']} acked)"
    if "relay" in phase:
        r = phase["relay"]
        text += f", subscriber got {r['received']}/{r['sent']} sent"
    if "profile" in phase and "self_pct" in phase["profile"]:
        top = phase["profile"]["self_pct"][:3]
        text += ", top: " + "; ".join(f"{n} {p}%" for n, p in top)
    return text


def _get(d: Any, *path: str) -> Any:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def fmt(value: Any, spec: str, unit: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:{spec}}{unit}"


def ratio(a: Any, b: Any) -> str:
    if a is None or b is None or not b:
        return "-"
    return f"{a / b:.2f}x"


def verdict(ok: bool | None) -> str:
    if ok is None:
        return "-"
    return "[green]met[/]" if ok else "[red]NOT met[/]"


def report(results: dict[str, Any]) -> None:
    i, m = results.get("iotmesh") or {}, results.get("mosquitto") or {}
    s = results["settings"]
    table = Table(
        title=f"MQTT ingest: {s['connections']:,} connections, {s['seconds']:g} s measured "
        f"per phase, QoS 1 window {s['window']}; load generator: {s['processes']} processes "
        f"on the same {results['machine']['cpu_count']} CPUs as the server"
    )
    for col in ("measure", "iotmesh", "Mosquitto", "iotmesh/Mosq.", "target", ""):
        table.add_column(col, justify="left" if col in ("measure", "") else "right")

    def row(label: str, a: Any, b: Any, spec: str, unit: str = "", cmp: bool = True) -> None:
        table.add_row(label, fmt(a, spec, unit), fmt(b, spec, unit), ratio(a, b) if cmp else "")

    q1i, q1m = _get(i, "qos1", "acked_msgs_per_s"), _get(m, "qos1", "acked_msgs_per_s")
    ok_q1 = None
    if q1i is not None and q1m:
        ok_q1 = q1i >= TARGETS["qos1_ratio"] * q1m and q1i >= TARGETS["qos1_msgs_per_s"]
    table.add_row(
        "QoS 1, max: PUBACKs/s",
        fmt(q1i, ",.0f"), fmt(q1m, ",.0f"), ratio(q1i, q1m),
        ">= 1.0x and >= 40,000", verdict(ok_q1),
    )  # fmt: skip
    for pct in ("p50", "p99"):
        row(
            f"  publish->PUBACK {pct}",
            _get(i, "qos1", "latency_ms", pct), _get(m, "qos1", "latency_ms", pct), ".1f", " ms",
        )  # fmt: skip
    add_resources(table, i, m, "qos1")

    half = results.get("half_rate")
    hi, hm = i.get("qos1_half"), m.get("qos1_half")
    row(
        f"QoS 1 at half rate ({fmt(half, ',.0f')}/s): PUBACKs/s",
        _get(hi, "acked_msgs_per_s"), _get(hm, "acked_msgs_per_s"), ",.0f", cmp=False,
    )  # fmt: skip
    row(
        "  publish->PUBACK p50",
        _get(hi, "latency_ms", "p50"), _get(hm, "latency_ms", "p50"), ".1f", " ms",
    )  # fmt: skip
    p99i = _get(hi, "latency_ms", "p99")
    table.add_row(
        "  publish->PUBACK p99 (iotmesh: publish->commit)",
        fmt(p99i, ".1f", " ms"), fmt(_get(hm, "latency_ms", "p99"), ".1f", " ms"),
        ratio(p99i, _get(hm, "latency_ms", "p99")), "<= 20 ms",
        verdict(None if p99i is None else p99i <= TARGETS["half_rate_p99_ms"]),
    )  # fmt: skip
    add_resources(table, i, m, "qos1_half")

    row(
        "QoS 0 flood: messages/s sent into TCP",
        _get(i, "qos0", "sent_msgs_per_s"), _get(m, "qos0", "sent_msgs_per_s"), ",.0f",
    )  # fmt: skip
    v, r = _get(i, "qos0", "verify"), _get(m, "qos0", "relay")
    table.add_row(
        "  delivered/sent (iotmesh: stored, sample; Mosq.: to subscriber)",
        f"{v['stored']:,}/{v['sent']:,} ({v['stored_over_sent']:.1%})" if v and v["sent"] else "-",
        f"{r['received']:,}/{r['sent']:,} ({r['received_over_sent']:.1%})"
        if r and r["sent"]
        else "-",
        "",
    )
    e_i, e_m = qos0_effective(i), qos0_effective(m)
    row(
        "  end to end: all sent / seconds until all delivered, msg/s",
        e_i, e_m, ",.0f",
    )  # fmt: skip
    row(
        "  server peak RSS until delivered (backlog)",
        _get(v, "server_rss_mb_max_settle"), _get(r, "server_rss_mb_max_settle"), ",.0f", " MB",
    )  # fmt: skip
    add_resources(table, i, m, "qos0")

    ii, im = i.get("idle"), m.get("idle")
    rss_i, rss_m = _get(ii, "server_rss_mb_with_idle"), _get(im, "server_rss_mb_with_idle")
    ok_idle = None
    if rss_i is not None and ii is not None:
        # Judged with the SQLite writer process: it is part of the server (the sum of
        # the two RSS counts their shared library pages twice, so it errs high).
        whole = _get(ii, "server_tree_rss_mb_with_idle") or rss_i
        ok_idle = whole <= TARGETS["idle_rss_mb"] and ii["connected"] >= s["idle_connections"]
    table.add_row(
        f"{s['idle_connections']:,} idle connections: server RSS (connected)",
        fmt(rss_i, ",.0f", " MB") + (f" ({ii['connected']:,})" if ii else ""),
        fmt(rss_m, ",.0f", " MB") + (f" ({im['connected']:,})" if im else ""),
        ratio(rss_i, rss_m), "<= 200 MB", verdict(ok_idle),
    )  # fmt: skip
    row(
        "  RSS before them",
        _get(ii, "server_rss_mb_before"), _get(im, "server_rss_mb_before"), ",.0f", " MB",
        cmp=False,
    )  # fmt: skip
    row(
        "  with iotmesh's SQLite writer process (connected; the target's figure)",
        _get(ii, "server_tree_rss_mb_with_idle"), None, ",.0f", " MB", cmp=False,
    )  # fmt: skip
    Console(width=170).print(table)
    mach = results["machine"]
    print(
        f"{mach['cpu_model']}, {mach['cpu_count']} CPUs, Python {mach['python']}, "
        f"{mach['platform']}\n"
        "CPU is % of one core (the machine has "
        f"{mach['cpu_count'] * 100}%): the load generator shares the CPUs with the server, "
        "'loadgen' is the generator processes (and, for Mosquitto, the subscriber), and 'other' "
        "is everything else that ran meanwhile (e.g. other people's tests).\n"
        "iotmesh: PUBACK after the SQLite commit (synchronous="
        f"{results['settings']['iotmesh_sqlite_synchronous']}). Mosquitto: persistence "
        "false, PUBACK on receipt, one QoS 0 subscriber on '#'.\n"
        + (
            f"Load generator at nice +{nice} (the servers preempt it when both want a CPU).\n"
            if (nice := results["settings"].get("loadgen_nice"))
            else ""
        )
        + f"Results: {results['settings']['output']}"
    )


def qos0_effective(res: dict[str, Any]) -> float | None:
    """QoS 0 messages sent over the whole phase / seconds from its start until the last
    was delivered (stored: iotmesh's sample; relayed: Mosquitto's subscriber)."""
    phase = res.get("qos0") or {}
    check = phase.get("verify") or phase.get("relay") or {}
    after = check.get("complete_after_s")
    if not after:
        return None
    return float(phase["sent_total"] / after)


def add_resources(table: Table, i: dict[str, Any], m: dict[str, Any], phase: str) -> None:
    def cell(d: dict[str, Any]) -> str:
        p = d.get(phase)
        if not p:
            return "-"
        main = p.get("server_main_cpu_pct")
        return (
            f"{p['server_cpu_pct']:.0f}%"
            + (f" ({main:.0f}% main)" if main is not None and d is i else "")
            + f" / {p['loadgen_cpu_pct']:.0f}% / "
            f"{p['other_cpu_pct']:.0f}%, {p['server_rss_mb_max']:,.0f} MB"
        )

    table.add_row("  CPU server+writer (main) / loadgen / other, peak RSS", cell(i), cell(m), "")
