"""examples/polyglot: pods in any language resolve mesh names through the pod's own /etc/hosts.

A Node.js service (getaddrinfo, no meshctl code) calls ``http://b.service:PORT/`` behind the
sidecar, a shell job calls it with curl, and ``meshctl exec web -- getent hosts b.service`` shows
what every process of the pod sees. The host's /etc/hosts never changes.
"""

from __future__ import annotations

import json
import re
import shutil
import urllib.request
from pathlib import Path

import pytest

from meshctl.supervisor.pod_namespace import pod_hosts_problem
from tests.conftest import POD_ALIAS_PROBE, ROOT, free_port, free_ports, wait_for

TOPOLOGY = ROOT / "examples/polyglot/polyglot.yaml"
HOST_HOSTS = Path("/etc/hosts")
B_ANSWER = "Node web: B said: Service B: Yay! nounce <n>"  # B's body as the traffic report masks it

POD_HOSTS_PROBLEM = pod_hosts_problem()

pytestmark = [
    pytest.mark.skipif(POD_HOSTS_PROBLEM is not None,
                       reason=f"pods cannot have their own /etc/hosts here: {POD_HOSTS_PROBLEM}"),
    pytest.mark.skipif(shutil.which("node") is None,
                       reason="examples/polyglot needs Node.js: `node` is not on PATH (Debian package nodejs)"),
    pytest.mark.skipif(shutil.which("curl") is None,
                       reason="examples/polyglot's job needs curl, which is not on PATH (Debian package curl)"),
]


def polyglot_env() -> dict[str, str]:
    """Free ports for every variable of polyglot.yaml; B never fails (ERROR_RATE 0); a quick job."""
    b_port, b_metrics, web_port, ingress, admin = free_ports(5, POD_ALIAS_PROBE)
    return {"B_PORT": str(b_port), "B_METRICS_PORT": str(b_metrics), "WEB_PORT": str(web_port),
            "WEB_INGRESS_PORT": str(ingress), "WEB_ADMIN_PORT": str(admin),
            "WEB_PUBLISH_PORT": str(free_port()), "B_ERROR_RATE": "0", "JOB_EVERY": "0.2"}


def host_hosts_state() -> tuple[bytes, list[str]]:
    """The host's /etc/hosts bytes, and the mounts on /etc/hosts seen from this (the host's) namespace."""
    mounts = [line for line in Path("/proc/self/mountinfo").read_text().splitlines()
              if " /etc/hosts " in line]
    return HOST_HOSTS.read_bytes(), mounts


def replica_ip(meshctl, project: str, replica: str) -> str:
    return next(p["ip"] for p in meshctl.ps(project)["processes"] if p["replica"] == replica)


def test_node_service_reaches_b_by_name_through_the_sidecar_and_the_host_hosts_file_stays(meshctl):
    before = host_hosts_state()
    # Otherwise Node could resolve b.service through the host's file, and this would prove nothing.
    assert b"b.service" not in before[0], "the host's /etc/hosts already names b.service"
    env = polyglot_env()
    meshctl.up(TOPOLOGY, "pgweb", env=env)

    report = json.loads(meshctl("traffic", "web", "--n", "50", "--json", "-p", "pgweb").stdout)
    # ERROR_RATE 0: every request must succeed, and only through /etc/hosts could Node find B.
    assert report["requests"] == 50 and report["status"] == {"200": 50} and not report["errors"], report
    assert report["groups"] == [{"count": 50, "status": "200", "body": B_ANSWER}], report["groups"]

    # `meshctl traffic web` went through web's sidecar: its ingress counted every one of them.
    web_ip = replica_ip(meshctl, "pgweb", "web-0")
    with urllib.request.urlopen(f"http://{web_ip}:{env['WEB_ADMIN_PORT']}/stats", timeout=10) as r:
        stats = dict(line.split(": ", 1) for line in r.read().decode().splitlines() if ": " in line)
    assert int(stats["cluster.local_service.upstream_rq_2xx"]) >= 50, stats

    during = host_hosts_state()
    meshctl("down", "-p", "pgweb")
    after = host_hosts_state()
    assert during == before, "the host's /etc/hosts (or its mounts) changed while the mesh ran"
    assert after == before, "the host's /etc/hosts (or its mounts) changed after the mesh stopped"


def test_shell_job_curls_b_by_name(meshctl):
    meshctl.up(TOPOLOGY, "pgjob", env=polyglot_env())
    # One line per call, "job N: STATUS BODY" (after a "job-0/service | " prefix where logs adds one);
    # the first may be 000 if B was not listening yet.
    ok = re.compile(r"(?:^|\| )job \d+: 200 Service B: Yay! nounce \d+$", re.M)

    def logged() -> str | None:
        out = meshctl("logs", "job", "-p", "pgjob").stdout
        return out if ok.search(out) else None

    logs = wait_for(logged, 20, interval=0.2)
    assert logs, meshctl("logs", "job", "-p", "pgjob").stdout
    assert "Could not resolve host" not in logs, logs


def test_exec_getent_in_web_sees_b_alias(meshctl):
    meshctl.up(TOPOLOGY, "pgexec", env=polyglot_env())
    b_ip = replica_ip(meshctl, "pgexec", "b-0")
    out = meshctl("exec", "-p", "pgexec", "web", "--", "getent", "hosts", "b.service").stdout
    assert out.split() == [b_ip, "b.service"], out
