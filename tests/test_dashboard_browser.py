"""`meshctl dashboard` in a real browser: headless Chromium (tests/browser.py) loads the page of a live mesh and
the test reads the DOM the page drew, as a person would see it, against `meshctl stats -o json`."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.browser import SEED_DRAWN, Browser, DashboardProcess, blank_png_size, find_chromium, png_dimensions
from tests.conftest import POD_ALIAS_PROBE, ROOT, bind_problem, free_port, require_ports, seed_sidecar_env

pytestmark = pytest.mark.skipif(find_chromium() is None,
                                reason="no Chromium on PATH (chromium or chromium-browser; Debian: apt-get install "
                                       "chromium, which .ci/run does)")

WIDTH, HEIGHT = 1400, 900
#: Requests the dashboard's window must hold on the a -> b edge before its success is compared (see below).
MIN_REQUESTS = 1000


@pytest.fixture
def browser() -> Iterator[Browser]:
    with Browser(WIDTH, HEIGHT) as b:
        yield b


def seed_sidecar() -> tuple[Path, dict[str, str]]:
    """The seed sidecar demo for this user, as `make demo-sidecar` picks it: the seed's own file (port 80) with
    the privilege for it, else its unprivileged variant (same services, same retries, ports above 1024)."""
    problem = bind_problem(POD_ALIAS_PROBE, 80)
    if not (problem and "needs root" in problem):
        return ROOT / "examples/seed/sidecar.yaml", seed_sidecar_env()
    require_ports("examples/seed/sidecar-unprivileged.yaml binds fixed ports in its pods",
                  *((POD_ALIAS_PROBE, port) for port in (8000, 8080, 8081, 9001, 9901)))
    return ROOT / "examples/seed/sidecar-unprivileged.yaml", {"PUBLISH_PORT": str(free_port())}


def edge_ab(b: Browser) -> dict[str, str]:
    """The a -> b edge's data-* attributes and its label's text, as drawn."""
    return b.evaluate("(() => { const e = document.querySelector('#graph g.edge[data-from=\"a\"][data-to=\"b\"]');"
                      " const t = e.querySelector('text');"
                      " return {...e.dataset, label: t ? t.textContent : ''}; })()")


def view_from_page(b: Browser) -> dict:
    """/api/view fetched by the page itself (the token's cookie is the page's): measured_s, which the DOM does
    not show, tells how much of the window holds traffic."""
    return b.evaluate("fetch('/api/view').then(r => r.json())")


def test_dashboard_draws_the_seed_sidecar_demo_like_stats(meshctl, browser, tmp_path):
    topology, env = seed_sidecar()
    meshctl.up(topology, "dashbr", env=env)
    blank = blank_png_size(browser)  # what an empty page of this size compresses to, from the same browser
    # Two connections: ~400 rps here, so the 10 s window holds thousands of requests. Not more: Envoy's default
    # max_retries breaker (3 retries in flight) would overflow and turn retried failures into final ones. Bounded
    # by count and time; stopped as soon as the numbers are read.
    load_log = tmp_path / "traffic.log"
    with load_log.open("w") as log:
        load = subprocess.Popen([sys.executable, "-m", "meshctl", "traffic", "a", "-p", "dashbr", "-c", "2",
                                 "--duration", "90s", "--n", "40000", "--workers", "1", "--no-progress", "--json"],
                                env=meshctl.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        with DashboardProcess("dashbr", env=meshctl.env, cwd=ROOT) as dash:
            assert dash.url.startswith("http://127.0.0.1:") and "token=" in dash.url, dash.url
            browser.navigate(dash.url)
            browser.wait_for(SEED_DRAWN, 60)
            # The window's traffic, before comparing (a condition on the server's own view, not a sleep).
            browser.wait_for("fetch('/api/view').then(r => r.json()).then(v => v.edges.some(e => e.from === 'a'"
                             f" && e.to_pod === 'b' && e.rps * v.measured_s >= {MIN_REQUESTS}))", 60)
            view = view_from_page(browser)
            edge = edge_ab(browser)
            # Right after, the CLI's own numbers over a window of its own long enough for ~1000 requests.
            rps = float(edge["rps"])
            interval = min(15.0, max(3.0, 1.2 * MIN_REQUESTS / rps))
            stats = json.loads(meshctl("stats", "-p", "dashbr", "-o", "json", "--once", "--interval",
                                       f"{interval:.1f}").stdout)
            nodes = browser.evaluate("[...document.querySelectorAll('#graph g.node')].map(n => "
                                     "({pod: n.dataset.pod, status: n.dataset.status, "
                                     "text: n.querySelector('text') && n.querySelector('text').textContent}))")
            running = browser.evaluate("document.body.dataset.running")
            status = browser.evaluate("document.querySelector('#status').textContent")
            shot = tmp_path / "dashboard.png"
            size = browser.screenshot(shot)
    finally:
        load.kill()
        load.wait()
    traffic_out = load_log.read_text()

    # Both pods drawn, named, running; the page says which mesh it follows.
    by_pod = {n["pod"]: n for n in nodes}
    assert {"a", "b"} <= set(by_pod), nodes
    for pod in ("a", "b"):
        assert by_pod[pod]["status"] == "running" and pod in (by_pod[pod]["text"] or ""), nodes
    assert running == "true" and "dashbr" in status, status

    # The a -> b edge: its cluster, its figures, a visible label with the success as a percentage.
    assert edge["cluster"] == "remote_service_b", edge
    dash_success = float(edge["success"])
    assert "%" in edge["label"], edge
    view_edge = next(e for e in view["edges"] if e["from"] == "a" and e["to_pod"] == "b")
    assert view_edge["rps"] * view["measured_s"] >= MIN_REQUESTS, (view_edge, traffic_out)

    stats_edge = next((e for e in stats["edges"] if e["from"] == "a" and e["to"] == edge["cluster"]), None)
    assert stats_edge is not None and stats_edge["success"] is not None, (stats, traffic_out)
    stats_requests = stats_edge["rps"] * stats["measured_s"]
    assert stats_requests >= 0.8 * MIN_REQUESTS, (stats_edge, stats["measured_s"], traffic_out)
    # The odds: a request fails only when B fails it three times (20 % each, two retries): q = 0.8 %, success
    # ~99.2 %. Failures in a window of n requests ~ Binomial(n, 0.008). With >= 1000 requests in the dashboard's
    # window and >= 800 in stats', P(|difference| > 2 %) = 5.9e-6 (exact binomial convolution, windows taken
    # as independent; they are back to back here, and overlap only makes them closer).
    assert abs(dash_success - stats_edge["success"]) <= 0.02, (edge, stats_edge)
    assert 0.95 <= dash_success <= 1.0, edge  # retries lift ~80 % per attempt to ~99 %
    assert float(edge["actual"]) < dash_success, edge  # and the per-attempt figure shows what they hid

    # The screenshot: a PNG of the window's size, with far more in it than an empty page of that size.
    data = shot.read_bytes()
    assert size == len(data) and png_dimensions(data) == (WIDTH, HEIGHT)
    assert size > 20_000 and size > 3 * blank, (size, blank)


def test_dashboard_shows_mesh_not_running_until_it_starts(meshctl, browser):
    with DashboardProcess("dashnr", env=meshctl.env, cwd=ROOT) as dash:
        browser.navigate(dash.url)
        status = browser.wait_for("document.body.dataset.running === 'false'"
                                  " && document.querySelector('#status').textContent", 30)
        assert "mesh not running" in status, status
        assert browser.evaluate("document.querySelectorAll('#graph g.node').length") == 0

        # The smallest mesh under that name: the open page follows it without a reload.
        topology = meshctl.write("solo.yaml", """
            pods:
              solo:
                service: {command: [sleep, "300"]}
        """)
        meshctl.up(topology, "dashnr")
        browser.wait_for("document.body.dataset.running === 'true'"
                         " && document.querySelector('#graph g.node[data-pod=\"solo\"]') !== null", 30)
        assert "mesh not running" not in browser.evaluate("document.querySelector('#status').textContent")

        meshctl("down", "-p", "dashnr")
        status = browser.wait_for("document.body.dataset.running === 'false'"
                                  " && document.querySelector('#status').textContent", 30)
        assert "mesh not running" in status, status
