"""meshctl stats: window math, histogram percentiles, JSON shape, crash-loop marking, and the live view in tmux."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys

import pytest

from meshctl.observe.promtext import parse
from meshctl.observe.window import Window, bucket_deltas, counter_delta, histogram_quantile
from tests.conftest import ROOT, seed_sidecar_env, wait_for


def test_counter_delta_never_negative_across_a_restart():
    assert counter_delta(10, 25) == 15
    assert counter_delta(None, 7) == 7  # a series that appeared during the window
    assert counter_delta(500, 30) == 30  # the process restarted: count since the restart
    assert counter_delta(5, None) is None  # gone: nothing to say
    assert counter_delta(3, 3) == 0


def test_bucket_deltas_and_reset():
    old = {1.0: 5, 10.0: 8, math.inf: 10}
    new = {1.0: 7, 10.0: 18, math.inf: 21}
    assert bucket_deltas(old, new) == {1.0: 2, 10.0: 10, math.inf: 11}
    restarted = {1.0: 1, 10.0: 2, math.inf: 2}
    assert bucket_deltas(old, restarted) == restarted


def test_histogram_quantile_from_buckets():
    # 100 observations: 50 in (0, 1], 40 in (1, 10], 10 in (10, 100]
    cum = {1.0: 50, 10.0: 90, 100.0: 100, math.inf: 100}
    assert histogram_quantile(0.5, cum) == pytest.approx(1.0)
    assert histogram_quantile(0.25, cum) == pytest.approx(0.5)
    assert histogram_quantile(0.7, cum) == pytest.approx(1 + 9 * 20 / 40)
    assert histogram_quantile(0.95, cum) == pytest.approx(10 + 90 * 5 / 10)
    assert histogram_quantile(0.99, {1.0: 0, math.inf: 0}) is None  # no traffic: no number
    assert histogram_quantile(0.99, {1.0: 1, math.inf: 5}) == 1.0  # beyond the last bound


def test_window_keeps_one_sample_older_than_the_window():
    w: Window[int] = Window(10)
    assert w.span() is None
    for t in range(0, 31, 2):
        w.add(float(t), t)
    old, new = w.span()
    assert new.t == 30 and old.t <= 20 and old.t >= 18


def test_promtext_parse():
    text = ('# TYPE x counter\nenvoy_cluster_upstream_rq{envoy_response_code="200",envoy_cluster_name="b"} 5\n'
            'envoy_server_live 1\nbad line\nh_bucket{le="+Inf"} 3\n')
    samples = parse(text)
    assert ("envoy_server_live", (), 1.0) in samples
    assert ("envoy_cluster_upstream_rq", (("envoy_cluster_name", "b"), ("envoy_response_code", "200")), 5.0) \
        in samples
    assert ("h_bucket", (("le", "+Inf"),), 3.0) in samples


def _stats_json(meshctl, project: str) -> dict:
    return json.loads(meshctl("stats", "-p", project, "-o", "json", "--interval", "0.5").stdout)


def test_stats_json_and_numbers_on_the_seed_sidecar_demo(meshctl):
    meshctl.up(ROOT / "examples/seed/sidecar.yaml", "stj", env=seed_sidecar_env())
    idle = _stats_json(meshctl, "stj")
    assert set(idle) == {"mesh", "window_s", "measured_s", "pods", "edges"}
    pods = {p["pod"]: p for p in idle["pods"]}
    assert set(pods) == {"a", "b"}
    assert set(pods["a"]) == {"pod", "status", "ready", "restarts", "cpu_percent", "rss_bytes", "meshed", "success",
                              "rps", "p50_ms", "p95_ms", "p99_ms", "retries_per_s", "upstream_5xx_per_s", "faults"}
    assert pods["a"]["ready"] == "2/2" and pods["a"]["status"] == "running" and pods["a"]["meshed"]
    assert pods["a"]["success"] is None and pods["a"]["p99_ms"] is None  # no traffic: no number, not zero
    load = subprocess.Popen([sys.executable, "-m", "meshctl", "traffic", "a", "-p", "stj", "--rate", "200",
                             "--duration", "6s", "--json"], env=meshctl.env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)

    def under_load() -> dict | None:
        """A snapshot taken while the load runs (its window saw traffic), or the last one if the load ended."""
        snap = _stats_json(meshctl, "stj")
        a = next(p for p in snap["pods"] if p["pod"] == "a")
        return snap if (a["rps"] or 0) > 50 or load.poll() is not None else None

    try:
        busy = wait_for(under_load, 30, interval=0.1)
    finally:
        out, _ = load.communicate(timeout=60)
    assert busy, "no stats snapshot while the load ran"
    pods = {p["pod"]: p for p in busy["pods"]}
    a = pods["a"]
    assert a["rps"] > 50 and 0.9 <= a["success"] <= 1.0
    assert 0 < a["p50_ms"] <= a["p95_ms"] <= a["p99_ms"]
    assert a["retries_per_s"] > 0 and a["upstream_5xx_per_s"] > 0
    edge = next(e for e in busy["edges"] if e["to"] == "remote_service_b")
    assert set(edge) == {"from", "to", "rps", "success", "actual_success", "retries_per_s", "timeouts_per_s",
                         "p99_ms", "faults", "to_pod"}
    assert edge["from"] == "a" and edge["to_pod"] == "b" and edge["rps"] > 50  # the cluster's endpoint is b's alias
    # B fails ~20 % of attempts; retries hide most of it from A.
    assert edge["actual_success"] < edge["success"]
    assert 0.6 < edge["actual_success"] < 0.95
    assert json.loads(out)["requests"] > 0


def test_crashloop_pod_is_marked(meshctl):
    topo = meshctl.write("cl.yaml", """
        pods:
          ok:
            ip: 127.0.123.1
            service: {command: [sleep, "300"]}
          flaky:
            ip: 127.0.124.1
            service: {command: [sh, -c, "exit 4"], restart: always}
    """)
    fg = subprocess.Popen([sys.executable, "-m", "meshctl", "up", str(topo), "-p", "stcl"], env=meshctl.env,
                          cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    meshctl.started.append("stcl")
    try:
        def looping() -> dict | None:
            res = meshctl("stats", "-p", "stcl", "-o", "json", "--interval", "0.2", check=False)
            if res.returncode != 0:
                return None
            pods = {p["pod"]: p for p in json.loads(res.stdout)["pods"]}
            return pods if pods["flaky"]["status"].startswith("crashloop") else None

        pods = wait_for(looping, 20, interval=0.3)
        assert pods, "flaky never shown as crash-looping"
        assert pods["flaky"]["status"] == "crashloop (exit 4)" and pods["flaky"]["ready"] == "0/1"
        assert pods["ok"]["status"] == "running"
        table = meshctl("stats", "-p", "stcl", "--once", "--interval", "0.2").stdout
        assert "crashloop (exit 4)" in table
    finally:
        fg.send_signal(signal.SIGINT)
        fg.wait(30)


@pytest.mark.skipif(not shutil.which("tmux"), reason="tmux not installed")
def test_live_view_in_a_real_terminal(meshctl):
    """Drive `meshctl stats` in tmux while traffic runs: rows appear, numbers change, q restores the shell."""
    meshctl.up(ROOT / "examples/seed/sidecar.yaml", "stlive", env=seed_sidecar_env())
    session = f"meshstats{os.getpid()}"
    env = " ".join(f"{k}={v}" for k, v in (("MESHCTL_HOME", meshctl.home), ("PYTHONPATH", ROOT)))
    tmux = ["tmux", "-L", session]
    subprocess.run([*tmux, "new-session", "-d", "-s", session, "-x", "160", "-y", "40", "bash", "--norc"],
                   check=True, env={**os.environ, "PS1": "READY$ "})
    load = None

    def screen() -> str:
        return subprocess.run([*tmux, "capture-pane", "-p", "-t", session], capture_output=True, text=True).stdout

    try:
        subprocess.run([*tmux, "send-keys", "-t", session,
                        f"{env} {sys.executable} -m meshctl stats -p stlive --interval 0.5; echo EXITED=$?",
                        "Enter"], check=True)
        assert wait_for(lambda: "remote_service_b" in screen() and "RETRIES/s" in screen(), 15), screen()
        load = subprocess.Popen([sys.executable, "-m", "meshctl", "traffic", "a", "-p", "stlive", "--rate", "300",
                                 "--duration", "8s", "--json"], env=meshctl.env, cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def a_row() -> list[str] | None:
            for line in screen().splitlines():
                cols = line.split()
                if cols[:2] == ["a", "running"] and len(cols) >= 13 and cols[7] != "-":
                    return cols
            return None

        first = wait_for(a_row, 10)
        assert first, screen()
        assert first[6].endswith("%") and float(first[7]) > 0  # SUCCESS and RPS are numbers now
        second = wait_for(lambda: (row := a_row()) != first and row, 10)
        assert second and second != first, (first, second)  # the table is live
        subprocess.run([*tmux, "send-keys", "-t", session, "q"], check=True)
        assert wait_for(lambda: "EXITED=0" in screen(), 10), screen()
        after = screen()
        assert "RETRIES/s" not in after  # alternate screen left: the table is gone, the shell is back
    finally:
        if load is not None:
            load.kill()
            load.wait()
        subprocess.run([*tmux, "kill-server"], capture_output=True)


def test_upstream_5xx_counts_one_failure_once():
    """A's service fails because B failed: A's sidecar sees a 5xx on its ingress (A) and on its egress (B).
    The pod's upstream 5XX is the egress side only (it was counted twice, 811/s at ~405 failures/s)."""
    from meshctl.observe.collector import _upstream_5xx
    from pods.replica import SidecarLaunch

    def idx(ingress: float, egress: float, retried: float) -> dict:
        def key(name: str, cluster: str) -> tuple:
            return (name, (("envoy_cluster_name", cluster), ("envoy_response_code_class", "5")))
        return {key("envoy_cluster_upstream_rq_xx", "local_service"): ingress,
                key("envoy_cluster_upstream_rq_xx", "remote_b"): egress,
                key("envoy_cluster_retry_upstream_rq_xx", "remote_b"): retried}

    egress = SidecarLaunch(args=(), admin_port=9901, listener_ports=(80, 9001), egress_port=9001,
                           ingress_stat_prefixes=("ingress",), egress_clusters=("remote_b",))
    assert _upstream_5xx(idx(0, 0, 0), idx(10, 10, 4), egress) == 14
    ingress_only = SidecarLaunch(args=(), admin_port=9901, listener_ports=(80,), egress_port=None,
                                 ingress_stat_prefixes=("ingress",), egress_clusters=())
    assert _upstream_5xx(idx(0, 0, 0), idx(10, 0, 0), ingress_only) == 10
