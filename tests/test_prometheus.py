"""The real Prometheus server as a mesh pod, scraping sidecars and services, as in the seed."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.parse
import urllib.request

import pytest
import yaml

from tests.conftest import POD_ALIAS_PROBE, ROOT, free_port, seed_sidecar_env, wait_for

needs_prometheus = pytest.mark.skipif(not shutil.which("prometheus"),
                                      reason="Debian's prometheus package is not installed (.ci/run installs it)")


def _query(port: int, expr: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return body["data"]["result"]


def _scalar(port: int, expr: str) -> float | None:
    result = _query(port, expr)
    return float(result[0]["value"][1]) if result else None


@needs_prometheus
def test_generated_config_passes_promtool(meshctl, tmp_path):
    # Nothing is bound here: any user may print the config of the seed (whose pods use port 80).
    out = meshctl("prometheus-config", str(ROOT / "examples/seed/sidecar.yaml")).stdout
    path = tmp_path / "prometheus.yml"
    path.write_text(out)
    res = subprocess.run(["promtool", "check", "config", str(path)], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stdout + res.stderr
    jobs = {j["job_name"]: j for j in yaml.safe_load(out)["scrape_configs"]}
    assert jobs["a/sidecar"]["metrics_path"] == "/stats/prometheus"
    assert jobs["b"]["metrics_path"] == "/metrics"
    labels = jobs["a/sidecar"]["static_configs"][0]["labels"]
    assert labels == {"pod": "a", "replica": "a-0", "role": "sidecar"}


@needs_prometheus
def test_seed_numbers_in_prometheus_agree_with_traffic(meshctl):
    # The seed's sidecar setup plus a prometheus: section on free ports, not 9090 (a local Prometheus
    # often has it); the default port and publish are checked in test_topology.
    env = seed_sidecar_env()
    listen, publish = free_port(POD_ALIAS_PROBE), free_port()
    shutil.copy(ROOT / "examples/seed/envoy.yaml", meshctl.workdir / "envoy.yaml")
    topo = meshctl.write("promseed.yaml", f"prometheus: {{port: {listen}, publish: {publish}}}\n"
                         + (ROOT / "examples/seed/sidecar.yaml").read_text())
    res = meshctl.up(topo, "promseed", env=env)
    assert "prometheus-0" in res.stdout and f"127.0.0.1:{publish}->{listen}" in res.stdout, res.stdout

    def scalar(expr: str) -> float | None:
        return _scalar(publish, expr)

    def query(expr: str) -> list[dict]:
        return _query(publish, expr)

    assert wait_for(lambda: scalar('count(up{pod="a",role="sidecar"} == 1)') == 1, 15)
    report = json.loads(meshctl("traffic", "a", "--n", "1000", "-c", "1", "-p", "promseed", "--json").stdout)
    assert report["requests"] == 1000
    ok, failed = report["status"].get("200", 0), report["status"].get("500", 0)

    def settled() -> bool:  # scrapes are every second: wait until Prometheus has the final counts
        retried = scalar('sum(envoy_cluster_retry_upstream_rq{envoy_cluster_name="remote_service_b"})') or 0.0
        # B is scraped apart from the sidecar: its count lags theirs until its own next scrape
        return (scalar('sum(envoy_cluster_upstream_rq{envoy_cluster_name="remote_service_b"})') == 1000
                and scalar('sum(service_a_requests_total)') == 1000
                and scalar("sum(service_b_requests_total)") == 1000 + retried)

    assert wait_for(settled, 15, interval=0.5), query('envoy_cluster_upstream_rq')
    retries = scalar('sum(envoy_cluster_retry_upstream_rq{envoy_cluster_name="remote_service_b"})')
    b_total = scalar("sum(service_b_requests_total)")
    b_errors = scalar('sum(service_b_requests_total{status="5xx"})')
    final_500 = scalar('sum(envoy_cluster_upstream_rq{envoy_cluster_name="remote_service_b",'
                       'envoy_response_code="500"})') or 0.0
    assert scalar('sum(service_a_requests_total{status="2xx"})') == ok
    assert (scalar('sum(service_a_requests_total{status="5xx"})') or 0.0) == failed
    assert final_500 == failed
    assert b_total == 1000 + retries  # every retry is one more request at B
    assert b_errors == retries + final_500
    assert 175 <= retries <= 305  # ~240 for ERROR_RATE 20 (4 standard deviations)
    up_labels = query('up{job="a/sidecar"}')[0]["metric"]
    assert up_labels["pod"] == "a" and up_labels["replica"] == "a-0" and up_labels["role"] == "sidecar"


def test_missing_prometheus_binary_is_one_line_and_the_mesh_still_starts(meshctl):
    topo = meshctl.write("np.yaml", """
        pods:
          web:
            ip: 127.0.125.1
            service:
              command: [python, -m, http.server, --bind, "${POD_IP}", "8000"]
              ready: {tcp: 8000}
    """)
    res = meshctl("up", str(topo), "-d", "-p", "noprom", "--prometheus-bin", "/nonexistent/prometheus")
    meshctl.started.append("noprom")
    errors = [line for line in res.stderr.splitlines() if "prometheus" in line]
    assert len(errors) == 1 and "apt-get install prometheus" in errors[0], res.stderr
    assert "Traceback" not in res.stderr
    st = meshctl.ps("noprom")
    assert [p["pod"] for p in st["processes"]] == ["web"] and st["processes"][0]["ready"]
