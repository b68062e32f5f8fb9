"""`make bench`: every benchmark in one run, written to bench/results/latest.{md,json} as a table of
figure, ours, peer, ratio, goal and whether it is met.

Ratios against a peer measured in the same run are what count: this machine is shared and noisy.
QUICK=1 (``--quick``) shortens every part (under two minutes) for a check before a performance commit.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import loadgen, mtls_hop, seed, sidecar_hop, startup, stats_overhead

RESULTS = Path(__file__).resolve().parent / "results"

Row = dict[str, Any]


def _row(figure: str, ours: float, unit: str, peer: float | None = None, peer_name: str = "",
         goal: str = "", met: bool | None = None, ratio: float | None = None, spread: str = "") -> Row:
    if ratio is None and peer:
        ratio = ours / peer
    return {"figure": figure, "ours": ours, "unit": unit, "spread": spread, "peer": peer, "peer_name": peer_name,
            "ratio": ratio, "goal": goal, "met": met}


def run(quick: bool) -> tuple[list[Row], dict[str, Any]]:
    raw: dict[str, Any] = {}
    rows: list[Row] = []

    def part(name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.monotonic()
        print(f"bench: {name} ...", flush=True)
        raw[name] = fn()
        print(f"bench: {name} done in {time.monotonic() - t0:.0f}s", flush=True)
        return raw[name]

    hop = part("sidecar_hop", lambda: sidecar_hop.measure(2 if quick else 5, 1 if quick else 3))
    s, h = hop["sidecar"], hop["haproxy"]
    rows.append(_row("sidecar hop throughput (wrk -c10 -> nginx)", s["rps"], "rps", h["rps"], "haproxy",
                     ">= 0.7x haproxy", s["rps"] / h["rps"] >= 0.7, spread=f"{s['rps_min']:.0f}-{s['rps_max']:.0f}"))
    rows.append(_row("sidecar hop vs nginx reverse proxy", s["rps"], "rps", hop["nginx-proxy"]["rps"], "nginx"))
    rows.append(_row("sidecar CPU per request", s["cpu_us_per_rq"], "us", h["cpu_us_per_rq"], "haproxy",
                     "<= 80 us", s["cpu_us_per_rq"] <= 80))
    rows.append(_row("sidecar p99 latency", s["p99_ms"], "ms", h["p99_ms"], "haproxy"))
    rows.append(_row("sidecar RSS under load", s["rss_mb"], "MB", h["rss_mb"], "haproxy", "<= 25 MB",
                     s["rss_mb"] <= 25))
    e = hop.get("envoy")
    if e is not None:  # the sidecar's true peer: the real Envoy, one worker, the same bootstrap
        rows.append(_row("sidecar vs real Envoy: throughput", s["rps"], "rps", e["rps"], "envoy --concurrency 1",
                         ">= 1.0x envoy", s["rps"] >= e["rps"]))
        rows.append(_row("sidecar vs real Envoy: CPU per request", s["cpu_us_per_rq"], "us", e["cpu_us_per_rq"],
                         "envoy", "<= envoy", s["cpu_us_per_rq"] <= e["cpu_us_per_rq"]))
        rows.append(_row("sidecar vs real Envoy: p50", s["p50_ms"], "ms", e["p50_ms"], "envoy"))
        rows.append(_row("sidecar vs real Envoy: p99", s["p99_ms"], "ms", e["p99_ms"], "envoy", "<= envoy",
                         s["p99_ms"] <= e["p99_ms"]))
        rows.append(_row("sidecar vs real Envoy: RSS", s["rss_mb"], "MB", e["rss_mb"], "envoy", "<= 0.5x envoy",
                         s["rss_mb"] <= 0.5 * e["rss_mb"]))

    for variant, figure in (("sidecar-again", "the plain sidecar again (A/A control: the bench's bias)"),
                            ("sidecar+live-faults", "inactive fault filter (--live-faults): rps vs plain"),
                            ("sidecar+ratelimit", "local rate limit that never limits: rps vs plain"),
                            ("sidecar+headers", "route header mutations: rps vs plain")):
        v = hop.get(variant)
        if v is not None:  # issue 13: each filter, enabled but inactive, costs <= 5 % (paired per repetition)
            rows.append(_row(figure, v["rps"], "rps", s["rps"], "plain sidecar", ">= 0.95x",
                             v["rps_vs_plain"] >= 0.95, ratio=v["rps_vs_plain"],
                             spread=f"{v['rps_min']:.0f}-{v['rps_max']:.0f}"))
    v = hop.get("sidecar+tracing")
    if v is not None:  # issue 15: tracing at 100 % sampling (spans per attempt, reported) costs <= 10 %
        rows.append(_row("Zipkin tracing, 100 % sampled and reported: rps vs plain", v["rps"], "rps", s["rps"],
                         "plain sidecar", ">= 0.90x plain", v["rps_vs_plain"] >= 0.90, ratio=v["rps_vs_plain"],
                         spread=f"{v['rps_min']:.0f}-{v['rps_max']:.0f}"))

    mt = part("mtls_hop", lambda: mtls_hop.measure(2 if quick else 5, 1 if quick else 3, 2 if quick else 3))
    ms, me = mt["sidecar"], mt.get("envoy")
    if me is not None:  # issue 14: the mTLS hop, a pair of our sidecars vs a pair of real Envoys
        rows.append(_row("mTLS hop (client sidecar -> TLS -> server sidecar): throughput", ms["rps"], "rps",
                         me["rps"], "envoy pair"))
        rows.append(_row("mTLS hop: CPU per request (both proxies)", ms["cpu_us_per_rq"], "us",
                         me["cpu_us_per_rq"], "envoy pair"))
        rows.append(_row("mTLS hop: p99", ms["p99_ms"], "ms", me["p99_ms"], "envoy pair"))
        rows.append(_row("mTLS handshakes/s, full (TLS 1.3, openssl s_time -new)", ms["handshakes_new_per_s"],
                         "/s", me["handshakes_new_per_s"], "envoy"))
        rows.append(_row("mTLS handshakes/s, full (TLS 1.2)", ms["handshakes_new_tls12_per_s"], "/s",
                         me["handshakes_new_tls12_per_s"], "envoy"))
        rows.append(_row("mTLS handshakes/s, resumed (TLS 1.2, s_time -reuse)", ms["handshakes_reuse_tls12_per_s"],
                         "/s", me["handshakes_reuse_tls12_per_s"], "envoy"))
        for key, what in (("new", "full TLS 1.3"), ("new_tls12", "full TLS 1.2"), ("reuse_tls12", "resumed TLS 1.2")):
            rows.append(_row(f"mTLS server CPU per handshake, {what}", ms[f"handshake_{key}_cpu_us"], "us",
                             me[f"handshake_{key}_cpu_us"], "envoy (BoringSSL)"))

    # issue 18: traffic >= 0.9x wrk and >= 2.5x hey at -c 10 (ratios paired per repetition; bench/loadgen.py says
    # what each tool may use on this 2-core machine)
    lg = part("loadgen", lambda: loadgen.measure(None, 1 if quick else 3, 2 if quick else 3))
    rows.append(_row("meshctl traffic -c10 -> nginx vs wrk -t1", lg["traffic"]["rps"], "rps", lg["wrk"]["rps"], "wrk",
                     f">= {loadgen.GOAL_VS_WRK}x wrk", lg["traffic_vs_wrk"] >= loadgen.GOAL_VS_WRK,
                     ratio=lg["traffic_vs_wrk"],
                     spread=f"{lg['traffic']['rps_min']:.0f}-{lg['traffic']['rps_max']:.0f}"))
    rows.append(_row("meshctl traffic -c10 -> nginx vs hey", lg["traffic"]["rps"], "rps", lg["hey"]["rps"], "hey",
                     f">= {loadgen.GOAL_VS_HEY}x hey", lg["traffic_vs_hey"] >= loadgen.GOAL_VS_HEY,
                     ratio=lg["traffic_vs_hey"]))

    sd = part("seed", lambda: seed.measure(reps=1 if quick else 3))
    rows.append(_row("seed: 1000 requests, wall time", sd["traffic"]["wall_s"], "s", sd["curl"]["wall_s"],
                     "curl loop", ">= 20x faster", sd["speedup"] >= 20, ratio=sd["speedup"],
                     spread=f"{sd['traffic']['wall_min_s']:.2f}-{sd['traffic']['wall_max_s']:.2f}"))
    rows.append(_row("seed: success ratio (no sidecar)", sd["traffic"]["success_ratio"], "",
                     sd["curl"]["success_ratio"],
                     "curl loop", "~0.80"))

    st = part("startup", lambda: startup.measure(1 if quick else 3))
    # issue 18: seed direct <= 0.5 s, seed sidecar <= 1.0 s, 50 pods <= 8 s
    rows.append(_row("seed direct up -d to ready", st["seed_direct_up_s"], "s", goal="<= 0.5 s",
                     met=st["seed_direct_up_s"] <= 0.5,
                     spread=f"{st['seed_direct_up_min_s']:.2f}-{st['seed_direct_up_max_s']:.2f}"))
    rows.append(_row("seed demo (sidecar) up -d to ready", st["seed_up_s"], "s", goal="<= 1.0 s",
                     met=st["seed_up_s"] <= 1.0, spread=f"{st['seed_up_min_s']:.2f}-{st['seed_up_max_s']:.2f}"))
    rows.append(_row("50 pods (100 processes) up -d to ready", st["fifty_up_s"], "s", goal="<= 8 s",
                     met=st["fifty_up_s"] <= 8, spread=f"{st['fifty_up_min_s']:.1f}-{st['fifty_up_max_s']:.1f}"))
    rows.append(_row("supervisor idle CPU, 100 processes", st["supervisor_idle_cpu_pct"], "%", goal="<= 1 %",
                     met=st["supervisor_idle_cpu_pct"] <= 1))
    rows.append(_row("RSS: sidecar (idle)", st["sidecar_rss_mb"], "MB", goal="<= 25 MB",
                     met=st["sidecar_rss_mb"] <= 25))
    rows.append(_row("RSS: demo service B", st["service_rss_mb"], "MB"))
    rows.append(_row("RSS: supervisor (100 processes)", st["supervisor_rss_mb"], "MB"))

    so = part("stats_overhead", lambda: stats_overhead.measure(2 if quick else 4, 1 if quick else 3))
    rows.append(_row("mesh at 800 rps while `stats` polls: delivered", so["rps_with_stats"], "rps",
                     so["rps_without_stats"], "no stats", "<= 5 % loss", so["loss_pct"] <= 5))
    rows.append(_row("mesh at 800 rps while `stats` polls: p50", so["p50_ms_with_stats"], "ms",
                     so["p50_ms_without_stats"], "no stats"))
    return rows, raw


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.2f}"


def render(rows: list[Row], header: str) -> str:
    out = [header, "", "| figure | ours | peer | ratio | goal | met? |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        ours = f"{_fmt(r['ours'])} {r['unit']}" + (f" ({r['spread']})" if r["spread"] else "")
        peer = f"{_fmt(r['peer'])} {r['unit']} ({r['peer_name']})" if r["peer"] is not None else "-"
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-"
        met = "-" if r["met"] is None else ("yes" if r["met"] else "**no**")
        out.append(f"| {r['figure']} | {ours} | {peer} | {ratio} | {r['goal'] or '-'} | {met} |")
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    started = time.time()
    rows, raw = run(args.quick)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started))
    header = (f"# meshctl benchmarks — {stamp}{' (quick)' if args.quick else ''}\n\n"
              f"Machine: {platform.machine()}, {platform.python_implementation()} {platform.python_version()}; "
              f"medians over repetitions (min-max in brackets); peers measured in the same run. "
              f"Took {time.time() - started:.0f}s.")
    table = render(rows, header)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.md").write_text(table)
    (RESULTS / "latest.json").write_text(json.dumps({"date": stamp, "quick": args.quick, "rows": rows, "raw": raw},
                                                    indent=1, default=str))
    print(table)


if __name__ == "__main__":
    main()
