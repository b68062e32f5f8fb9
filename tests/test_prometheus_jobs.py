"""Prometheus scrape jobs are unique by construction, whatever the pods are called."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

TOPOLOGY = """
    pods:
      x:
        service:
          command: [python, -m, http.server, --bind, "${POD_IP}", "8000"]
        sidecar:
          ingress: {port: 8080, to: 8000}
          admin: {port: 9901}
        metrics: {port: 8001}
      x-sidecar:
        service:
          command: [python, -m, http.server, --bind, "${POD_IP}", "8000"]
        metrics: {port: 8000}
"""


def _config(meshctl) -> str:
    topo = meshctl.write("jobs.yaml", TOPOLOGY)
    return meshctl("prometheus-config", str(topo), "-p", "promjobs").stdout


def test_a_pod_named_like_another_pods_sidecar_gets_its_own_job(meshctl):
    jobs = yaml.safe_load(_config(meshctl))["scrape_configs"]
    names = [j["job_name"] for j in jobs]
    assert len(names) == len(set(names)), names
    by_name = {j["job_name"]: j for j in jobs}
    sidecar = by_name["x/sidecar"]
    assert sidecar["metrics_path"] == "/stats/prometheus"
    assert sidecar["static_configs"][0]["labels"] == {"pod": "x", "replica": "x-0", "role": "sidecar"}
    service = by_name["x-sidecar"]
    assert service["static_configs"][0]["labels"] == {"pod": "x-sidecar", "replica": "x-sidecar-0", "role": "service"}


@pytest.mark.skipif(not shutil.which("promtool"), reason="promtool is not installed (Debian's prometheus package)")
def test_promtool_accepts_the_config_with_colliding_looking_pod_names(meshctl, tmp_path):
    path = tmp_path / "prometheus.yml"
    path.write_text(_config(meshctl))
    res = subprocess.run(["promtool", "check", "config", str(path)], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stdout + res.stderr
