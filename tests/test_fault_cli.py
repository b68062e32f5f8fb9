"""`meshctl fault` on a running mesh (our sidecar): inject, list, clear; bad input. Addresses 127.0.247-249.x.

Odds: an abort of 50 % over 400 requests is Binomial(400, .5) (sigma 10); the 4-sigma bound fails by
chance about once in 16,000 runs.
"""

from __future__ import annotations

import http.client
import json
import sys

from tests.conftest import free_port

TOPO = """
name: {name}
pods:
  b:
    ip: 127.0.248.1
    service:
      command: [{py}, -m, services.b]
      env: {{ERROR_RATE: "0", SERVICE_PORT: "{bport}", METRICS_PORT: "{mport}"}}
      ready: {{tcp: {bport}}}
  a:
    ip: 127.0.247.1
    sidecar:
      egress:
        port: {eport}
        routes:
          - host: b.local.service
            to: b:{bport}
      admin: {{port: {aport}}}
    service:
      command: [{py}, -c, "import time; time.sleep(3600)"]
  c:
    ip: 127.0.249.1
    service:
      command: [{py}, -c, "import time; time.sleep(3600)"]
"""


def _codes(n: int, port: int) -> list[int]:
    conn = http.client.HTTPConnection("127.0.247.1", port, timeout=10)
    out = []
    for _ in range(n):
        conn.request("GET", "/", headers={"Host": "b.local.service"})
        r = conn.getresponse()
        r.read()
        out.append(r.status)
    conn.close()
    return out


def test_fault_inject_list_clear(meshctl):
    ports = dict(bport=free_port("127.0.248.1"), mport=free_port("127.0.248.1"), eport=free_port("127.0.247.1"),
                 aport=free_port("127.0.247.1"))
    topo = meshctl.write("f.yaml", TOPO.format(name="faultcli", py=sys.executable, **ports))
    meshctl.up(topo, "faultcli")
    assert _codes(5, ports["eport"]) == [200] * 5

    r = meshctl("fault", "a", "b", "--abort", "50%", "--status", "503", "-p", "faultcli")
    assert "egress -> b" in r.stdout
    codes = _codes(400, ports["eport"])
    assert 160 <= codes.count(503) <= 240 and codes.count(503) + codes.count(200) == 400

    listed = meshctl("fault", "--list", "-p", "faultcli").stdout
    assert "a" in listed and "egress" in listed and "abort 50% (503)" in listed

    meshctl("fault", "a", "b", "--delay", "200ms@100%", "-p", "faultcli")  # replaces the abort
    assert "delay 200ms@100%" in meshctl("fault", "--list", "-p", "faultcli").stdout
    meshctl("fault", "--clear", "-p", "faultcli")
    assert "no active faults" in meshctl("fault", "--list", "-p", "faultcli").stdout
    assert _codes(20, ports["eport"]) == [200] * 20

    for args, msg in [(["a", "b", "--abort", "150%"], "from 0 to 100"),
                      (["a", "b", "--delay", "-5ms"], "negative"),
                      (["c", "b", "--abort", "10%"], "no sidecar"),
                      (["a", "c", "--abort", "10%"], "no egress route")]:
        r = meshctl("fault", *args, "-p", "faultcli", check=False)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr

    # runtime keys are the sidecar's own: GET /runtime shows them
    meshctl("fault", "a", "b", "--abort", "12.5%", "-p", "faultcli")
    dump = json.loads(meshctl("admin", "a", "/runtime", "-p", "faultcli").stdout)
    assert dump["entries"]["fault.http.egress.b.abort.abort_percent"]["final_value"] == "1250"

    # meshctl stats marks the edge: a FAULTS cell, and "faults" per edge in -o json
    snap = json.loads(meshctl("stats", "-p", "faultcli", "-o", "json", "--interval", "0.3").stdout)
    marked = [e for e in snap["edges"] if e["faults"]]
    assert [(e["from"], e["faults"][0]["abort_percent"], e["faults"][0]["status"]) for e in marked] == \
        [("a", 12.5, 503)], snap["edges"]
    assert all(not p["faults"] for p in snap["pods"])
    table = meshctl("stats", "-p", "faultcli", "--once", "--interval", "0.3").stdout
    assert "FAULTS" in table and "abort 12.5% (503)" in table, table
    meshctl("fault", "--clear", "-p", "faultcli")
    snap = json.loads(meshctl("stats", "-p", "faultcli", "-o", "json", "--interval", "0.3").stdout)
    assert all(not e["faults"] for e in snap["edges"])
