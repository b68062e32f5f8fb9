"""The seed's point, end to end: an Envoy-configured sidecar turns ~80 % into ~99 % success."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request

from tests.conftest import ROOT, seed_sidecar_env


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    found = False
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})?\s+(\S+)$", line)
        if not m:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(2))
            found = True
    assert found, f"no sample of {name}{labels}"
    return total


def proc(status: dict, replica: str, role: str) -> dict:
    return next(p for p in status["processes"] if p["replica"] == replica and p["role"] == role)


def seed_retry_numbers(a_ip: str, b_ip: str) -> tuple[str, float]:
    """After 1000 sequential requests to the seed's A through its sidecar (either engine): every request B
    saw is accounted for by the sidecar's stats, and the retry numbers are the seed's. Returns the sidecar's
    /stats/prometheus text and its retried count."""
    envoy = scrape(f"http://{a_ip}:9901/stats/prometheus")
    b = scrape(f"http://{b_ip}:8081/metrics")
    retried_500 = metric(envoy, "envoy_cluster_retry_upstream_rq", envoy_response_code="500",
                         envoy_cluster_name="remote_service_b")
    final_500 = metric(envoy, "envoy_cluster_upstream_rq", envoy_response_code="500",
                       envoy_cluster_name="remote_service_b")
    final_200 = metric(envoy, "envoy_cluster_upstream_rq", envoy_response_code="200",
                       envoy_cluster_name="remote_service_b")
    b_ok = metric(b, "service_b_requests_total", status="2xx")
    b_err = metric(b, "service_b_requests_total", status="5xx")
    assert b_ok == final_200 and b_err == retried_500 + final_500
    assert final_200 + final_500 == 1000
    # ~1240 requests reach B (1000 x 1.24) and ~240 were retries: +-65 is 4 standard deviations
    # (P(outside) = 6.1e-5 each, computed exactly for Binomial(1000, 0.2) first failures and their retries).
    assert 1175 <= b_ok + b_err <= 1305, (b_ok, b_err)
    assert 175 <= retried_500 <= 305, retried_500
    return envoy, retried_500


def test_seed_sidecar_retries_lift_success_to_99_percent(meshctl):
    meshctl.up(ROOT / "examples/seed/sidecar.yaml", "seedsc", env=seed_sidecar_env())
    st = meshctl.ps("seedsc")
    side, svc = proc(st, "a-0", "sidecar"), proc(st, "a-0", "service")
    assert side["ready"] and svc["ready"]
    assert side["uptime_s"] >= svc["uptime_s"]  # the sidecar was started (and ready) first
    a_ip, b_ip = side["ip"], proc(st, "b-0", "service")["ip"]

    # Sequential, like the seed's curl loop.
    report = json.loads(meshctl("traffic", "a", "--n", "1000", "-c", "1", "-p", "seedsc", "--json").stdout)
    assert report["requests"] == 1000 and not report["errors"]
    # P(fail) = 0.2^3 = 0.008 per request: >= 98 % holds with odds > 99.9 %.
    assert report["success_ratio"] >= 0.98, report

    envoy, retried_500 = seed_retry_numbers(a_ip, b_ip)
    assert metric(envoy, "envoy_cluster_upstream_rq_retry", envoy_cluster_name="remote_service_b") == retried_500
    ingress_ok = metric(envoy, "envoy_cluster_upstream_rq", envoy_response_code="200",
                        envoy_cluster_name="local_service")
    assert ingress_ok == report["status"].get("200")

    # A foreign client through the egress listener, as with HTTP_PROXY.
    url = "http://b.local.service/"
    if shutil.which("curl"):
        out = subprocess.run(["curl", "-s", "-x", f"http://{a_ip}:9001", url], capture_output=True, text=True,
                             timeout=10).stdout
    else:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": f"http://{a_ip}:9001"}))
        out = opener.open(url, timeout=10).read().decode()
    assert out.startswith("Service B: Yay! nounce") or out.startswith("Service B: Ooops... nounce")

    # The sidecar's access log (Envoy's default format) is in its log file.
    log = meshctl("logs", "a-0", "--role", "sidecar", "-p", "seedsc", "--tail", "5").stdout
    assert re.search(r'^\[\d{4}-\d\d-\d\dT[\d:.]+Z\] "GET / HTTP/1.1" \d{3} ', log, re.M), log


def test_short_form_sidecar_sets_proxy_env_and_retries(meshctl):
    # Unprivileged ports (not the seed's 80), so that any user can run it.
    topo = meshctl.write("sf.yaml", """
        pods:
          b:
            ip: 127.0.121.1
            service:
              command: [python, -m, services.b]
              env: {ERROR_RATE: "50", SERVICE_PORT: "8100", METRICS_PORT: "8081"}
              ready: {tcp: 8100}
          a:
            ip: 127.0.122.1
            add_hosts: {b.local: 127.0.0.1}
            sidecar:
              ingress: {port: 8100, to: 8000}
              egress:
                port: 9001
                routes:
                  - host: b.local
                    to: b:8100
                    retry_policy: {retry_on: 5xx, num_retries: 9}
              admin: {port: 9901}
            service:
              command: [python, -m, services.a]
              env: {SERVICE_HOST: 127.0.0.1, SERVICE_PORT: "8000", METRICS_PORT: "8082",
                    UPSTREAM_SERVICE: "http://b.local:9001/"}
              ready: {tcp: 8000}
    """)
    meshctl.up(topo, "sf")
    st = meshctl.ps("sf")
    svc = proc(st, "a-0", "service")
    env = dict(kv.split("=", 1) for kv in open(f"/proc/{svc['pid']}/environ").read().split("\0") if "=" in kv)
    assert env["HTTP_PROXY"] == "http://127.0.122.1:9001"
    assert "127.0.122.1" in env["NO_PROXY"]
    report = json.loads(meshctl("traffic", "http://127.0.122.1:8100/", "--n", "200", "-c", "1", "--json").stdout)
    # P(fail) = 0.5^10 ~ 0.001 per request: 200 requests fail > 5 times with odds < 1e-6.
    assert report["status"].get("200", 0) >= 195, report
    stats = json.loads(scrape("http://127.0.122.1:9901/stats?format=json"))
    values = {s["name"]: s["value"] for s in stats["stats"] if "name" in s}
    assert values["cluster.b.upstream_rq_retry"] > 0
    assert values["http.ingress_http.downstream_rq_2xx"] >= 195


def test_sidecar_mistakes_are_reported_with_file_and_line(meshctl):
    cases = {
        "typo": ("    sidecar:\n      egress:\n        port: 9001\n        routes:\n"
                 "          - {host: b.local, to: 'b:80', retry_polcy: {retry_on: 5xx}}\n", 5, "retry_polcy"),
        "missing": ("    sidecar: {envoy: nope.yaml}\n", 5, "not found"),
        "clash": ("    sidecar: {ingress: {port: 8000, to: 8001}}\n", 5, "clashes with SERVICE_PORT"),
    }
    for name, (sidecar, line, phrase) in cases.items():
        path = meshctl.write(f"{name}.yaml", "pods:\n  a:\n    service:\n      command: [sleep, '5']\n"
                             "      env: {SERVICE_PORT: '8000'}\n" + sidecar)
        text = path.read_text().splitlines()
        line = next(i for i, t in enumerate(text, 1) if t.strip().startswith("sidecar:"))
        res = meshctl("validate", str(path), check=False)
        assert res.returncode == 2, (name, res)
        assert res.stderr.startswith(f"{path}:{line}: pod 'a' sidecar: "), (name, res.stderr)
        assert phrase in res.stderr and "Traceback" not in res.stderr, (name, res.stderr)

