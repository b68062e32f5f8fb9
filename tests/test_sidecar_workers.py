"""``python -m sidecar --concurrency N``: worker processes sharing the listeners (sidecar/workers.py).

Real processes and sockets. Addresses: 127.0.140.x (sidecars), 127.0.141.x (upstreams), 127.0.142-143.x (a mesh).
Connections are spread over the workers by the kernel's SO_REUSEPORT hash: tests that need both workers to serve
send each request on a new connection (the chance that N of them all land on one of two workers is 2^(1-N)).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from sidecar.access_log import _Sink
from sidecar.stats import ServerStats, Store
from sidecar.stats_merge import MergedStore, Totals, snapshot
from tests.conftest import ROOT, free_port, terminate, wait_until
from tests.test_sidecar_proxy import admin_socket_request, request
from tests.upstreams import UpstreamServer

POD = "127.0.140.1"
UPSTREAM = "127.0.141.1"


# --- the merge, in-process ------------------------------------------------------------------------------------------


def _worker_store(requests: int, times: list[float], active: int, membership: int) -> Store:
    s = Store()
    s.register_cluster("b.svc")
    s.counter("cluster.b.svc.upstream_rq_200").value = requests
    s.counter("listener.127.0.0.1_80.downstream_cx_total").value = requests
    s.gauge("listener.127.0.0.1_80.downstream_cx_active").value = active
    s.gauge("cluster.b.svc.upstream_cx_active").value = active
    s.gauge("cluster.b.svc.membership_total").value = membership
    s.derived_gauge("cluster.b.svc.circuit_breakers.default.rq_open", lambda: 0)
    s.gauge("server.uptime").value = 999
    h = s.histogram("cluster.b.svc.upstream_rq_time")
    for t in times:
        h.record(t)
    return s


def test_merge_sums_counters_and_work_gauges_keeps_state_gauges_and_merges_histograms():
    w0 = snapshot(_worker_store(3, [1.0, 2.0, 400.0], active=2, membership=3))
    w1 = snapshot(_worker_store(5, [0.2, 3.0], active=1, membership=3))
    merged = MergedStore()
    merged.update([(Totals(), w0), (Totals(), w1)])
    assert merged.counters["cluster.b.svc.upstream_rq_200"].value == 8
    assert merged.gauges["cluster.b.svc.upstream_cx_active"].value == 3
    assert merged.gauges["cluster.b.svc.membership_total"].value == 3  # each worker's view of one cluster
    assert merged.gauges["cluster.b.svc.circuit_breakers.default.rq_open"].value == 0
    assert "server.uptime" not in merged.gauges  # the parent's own
    h = merged.histograms["cluster.b.svc.upstream_rq_time"]
    assert (h.count, h.min, h.max) == (5, 0.2, 400.0) and h.sum == pytest.approx(406.2)
    alone = Store()
    for t in (1.0, 2.0, 400.0, 0.2, 3.0):
        alone.histogram("x").record(t)
    assert h.counts == alone.histograms["x"].counts  # the same buckets as one process recording all five
    # Envoy's per-worker listener stats, tagged as Envoy tags them.
    assert merged.counters["listener.127.0.0.1_80.worker_0.downstream_cx_total"].value == 3
    assert merged.counters["listener.127.0.0.1_80.worker_1.downstream_cx_total"].value == 5
    assert merged.gauges["listener.127.0.0.1_80.worker_1.downstream_cx_active"].value == 1
    ServerStats(merged, concurrency=2)  # as the parent has them
    merged.derived_gauge("server.total_connections", merged.open_connections)
    assert merged.gauges["server.total_connections"].value == 3  # the per-worker copies are not counted again
    prom = merged.render_prometheus()
    assert ('envoy_listener_worker_downstream_cx_total{envoy_worker_id="1",envoy_listener_address="127.0.0.1_80"} 5'
            in prom)
    assert 'envoy_cluster_upstream_rq{envoy_response_code="200",envoy_cluster_name="b.svc"} 8' in prom


def test_a_worker_that_exits_leaves_its_counts_and_its_gauges_go():
    retired = Totals()
    first = snapshot(_worker_store(10, [5.0], active=4, membership=1))
    merged = MergedStore()
    merged.update([(retired, first)])
    assert merged.counters["cluster.b.svc.upstream_rq_200"].value == 10
    retired.retire(first)  # the worker died; its replacement starts from zero
    merged.update([(retired, None)])
    assert merged.counters["cluster.b.svc.upstream_rq_200"].value == 10  # never goes down
    assert merged.gauges["cluster.b.svc.upstream_cx_active"].value == 0
    assert merged.gauges["listener.127.0.0.1_80.worker_0.downstream_cx_active"].value == 0
    merged.update([(retired, snapshot(_worker_store(2, [7.0], active=1, membership=1)))])
    assert merged.counters["cluster.b.svc.upstream_rq_200"].value == 12
    assert merged.counters["listener.127.0.0.1_80.worker_0.downstream_cx_total"].value == 12
    assert merged.histograms["cluster.b.svc.upstream_rq_time"].count == 2


def test_pipe_writes_are_whole_lines_of_at_most_pipe_buf():
    sink = _Sink.__new__(_Sink)
    pieces: list[bytes] = []
    sink._write = pieces.append  # type: ignore[method-assign]
    lines = [b"x" * n + b"\n" for n in (10, 3000, 1500, 5000, 1, 4095, 4096, 200)]
    sink._write_lines(b"".join(lines))
    assert b"".join(pieces) == b"".join(lines)
    for p in pieces:
        assert p.endswith(b"\n")
        assert len(p) <= select.PIPE_BUF or p.count(b"\n") == 1  # a line longer than PIPE_BUF goes alone


# --- real processes -------------------------------------------------------------------------------------------------


class Workers:
    """``python -m sidecar --concurrency N`` with an ingress to an upstream; stdout is a pipe the test reads."""

    def __init__(self, tmp: Path, n: int = 2, access_log: str = "/dev/stdout", extra: tuple[str, ...] = ()) -> None:
        self.up_port = free_port(UPSTREAM)
        self.upstream = UpstreamServer([(UPSTREAM, self.up_port)])
        self.ingress = free_port(POD)
        self.admin = free_port(POD)
        self.socket = str(tmp / "admin.sock")
        cfg = tmp / "sidecar.json"
        cfg.write_text(json.dumps({
            "ingress": {"port": self.ingress, "to": f"{UPSTREAM}:{self.up_port}"},
            "admin": {"port": self.admin}, "access_log": access_log}))
        self.argv = [sys.executable, "-m", "sidecar", "--config", str(cfg), "--pod-ip", POD,
                     "--admin-socket", self.socket, "--concurrency", str(n), *extra]
        self.n = n
        self.out = bytearray()
        self.slow_reader = False  # read 4 KiB per ms: the pipe is often full (a busy supervisor)
        self.proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None

    def start(self) -> Workers:
        self.upstream.start()
        env = {k: v for k, v in os.environ.items() if k not in ("MESH_HOSTS", "POD_IP")}
        env["PYTHONPATH"] = str(ROOT)
        self.proc = subprocess.Popen(self.argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        wait_until(self._live, "the sidecar and its workers to be LIVE", timeout=20)
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while chunk := os.read(fd, 4096 if self.slow_reader else 65536):
            self.out += chunk
            if self.slow_reader:
                time.sleep(0.001)

    def _live(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"sidecar exited {self.proc.returncode}: {self.output()}")
        try:
            return request(POD, self.admin, "/ready", timeout=1).body == b"LIVE\n"
        except OSError:
            return False

    def output(self) -> str:
        return self.out.decode(errors="replace")

    def workers(self) -> list[psutil.Process]:
        assert self.proc is not None
        return psutil.Process(self.proc.pid).children()

    def stats(self) -> dict[str, Any]:
        body = request(POD, self.admin, "/stats?format=json").json()
        return {s["name"]: s["value"] for s in body["stats"] if "name" in s}

    def admin_post(self, path: str) -> Any:
        return admin_socket_request(self.socket, path, method="POST")

    def stop(self) -> int | None:
        code = terminate(self.proc, 20)
        if self.proc is not None and self._reader is not None:
            self._reader.join(5)
        self.upstream.stop()
        return code


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    w = Workers(tmp_path)
    try:
        yield w.start()
    finally:
        left = w.workers() if w.proc is not None and w.proc.poll() is None else []
        w.stop()
        for p in left:
            if p.is_running():
                p.kill()


def _fresh_connections(port: int, n: int, path: str = "/", headers: dict[str, str] | None = None) -> list[int]:
    """n requests, each on a new connection (so the kernel's hash spreads them over the workers)."""
    return [request(POD, port, f"{path}?i={i}", headers={"Connection": "close", **(headers or {})}).status
            for i in range(n)]


def _per_worker(stats: dict[str, Any], port: int, n: int) -> list[int]:
    return [stats.get(f"listener.{POD}_{port}.worker_{i}.downstream_cx_total", 0) for i in range(n)]


def test_both_workers_serve_and_the_admin_shows_their_sum(workers):
    assert len(workers.workers()) == 2
    assert _fresh_connections(workers.ingress, 120) == [200] * 120
    stats = workers.stats()
    per = _per_worker(stats, workers.ingress, 2)
    assert all(per) and sum(per) == 120, per  # both served, and every connection is counted once
    assert stats["http.ingress_http.downstream_rq_2xx"] == 120
    assert stats[f"listener.{POD}_{workers.ingress}.downstream_cx_total"] == 120
    assert stats["cluster.local_service.upstream_rq_200"] == 120
    assert stats["server.concurrency"] == 2 and stats["server.live"] == 1
    assert sum(workers.upstream.hits.values()) == 120
    prom = request(POD, workers.admin, "/stats/prometheus").body.decode()
    assert re.search(r'^envoy_http_downstream_rq_time_count\{envoy_http_conn_manager_prefix="ingress_http"\} 120$',
                     prom, re.M), prom  # the histograms merged: one sample per request
    for i in (0, 1):
        assert re.search(rf'^envoy_listener_worker_downstream_cx_total\{{envoy_worker_id="{i}",'
                         rf'envoy_listener_address="{re.escape(POD)}_{workers.ingress}"\}} [1-9]', prom, re.M)
    clusters = request(POD, workers.admin, "/clusters").body.decode()
    assert f"local_service::{UPSTREAM}:{workers.up_port}::health_flags::healthy" in clusters
    info = request(POD, workers.admin, "/server_info").json()
    assert info["command_line_options"]["concurrency"] == 2 and info["state"] == "LIVE"


def test_a_mutating_admin_call_reaches_every_worker(tmp_path):
    w = Workers(tmp_path, extra=("--live-faults",)).start()
    try:
        key = "fault.http.ingress.local_service.abort"
        r = w.admin_post(f"/runtime_modify?{key}.abort_percent=1000000&{key}.http_status=418")
        assert (r.status, r.body) == (200, b"OK\n")
        assert _fresh_connections(w.ingress, 60) == [418] * 60  # every request, whichever worker took it
        assert all(_per_worker(w.stats(), w.ingress, 2))
        runtime = admin_socket_request(w.socket, "/runtime").json()
        assert runtime["entries"][f"{key}.http_status"]["final_value"] == "418"
        bad = w.admin_post("/runtime_modify?no.such.key=1")
        assert bad.status == 400 and b"unknown runtime key 'no.such.key'" in bad.body
        assert w.admin_post(f"/runtime_modify?{key}.abort_percent=").status == 200  # removed everywhere
        assert _fresh_connections(w.ingress, 30) == [200] * 30
        assert w.admin_post("/healthcheck/fail").status == 200
        assert request(POD, w.admin, "/ready").status == 503
        assert w.admin_post("/healthcheck/ok").status == 200
        assert request(POD, w.admin, "/ready").status == 200
        # quitquitquit stops the workers, then the parent.
        pids = [p.pid for p in w.workers()]
        assert w.admin_post("/quitquitquit").status == 200
        assert w.proc is not None and w.proc.wait(20) == 0
        wait_until(lambda: not any(psutil.pid_exists(p) for p in pids), "the workers to exit")
    finally:
        w.stop()


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_killed_worker_is_restarted_with_the_runtime_and_its_counts_kept(tmp_path):
    w = Workers(tmp_path, extra=("--live-faults",)).start()
    try:
        assert _fresh_connections(w.ingress, 40) == [200] * 40
        assert w.stats()["http.ingress_http.downstream_rq_2xx"] == 40  # (also the parent's last snapshot)
        key = "fault.http.ingress.local_service.abort"
        assert w.admin_post(f"/runtime_modify?{key}.abort_percent=1000000&{key}.http_status=418").status == 200
        victim = w.workers()[0]
        victim.kill()
        wait_until(lambda: len([p for p in w.workers() if p.pid != victim.pid and _alive(p.pid)]) == 2,
                   "a new worker in place of the killed one", timeout=15)
        wait_until(lambda: request(POD, w.admin, "/ready").status == 200, "LIVE")
        wait_until(lambda: "worker 0" in w.output() or "worker 1" in w.output(), "the restart to be logged")
        assert "was killed by SIGKILL; starting it again" in w.output()
        # The new worker has the parent's runtime override: every request is aborted, on both workers.
        before = _per_worker(w.stats(), w.ingress, 2)
        assert _fresh_connections(w.ingress, 60) == [418] * 60
        after = _per_worker(w.stats(), w.ingress, 2)
        assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)
        stats = w.stats()
        assert stats["http.ingress_http.downstream_rq_2xx"] == 40  # the dead worker's counts were kept
        assert stats["http.ingress_http.downstream_rq_4xx"] == 60
    finally:
        w.stop()


def test_sigkill_of_the_parent_leaves_no_worker(workers):
    pids = [p.pid for p in workers.workers()]
    assert len(pids) == 2
    assert workers.proc is not None
    workers.proc.kill()
    workers.proc.wait(5)
    wait_until(lambda: not any(_alive(p) for p in pids), "the workers to die with their parent", timeout=5)
    with pytest.raises(OSError):  # and nobody listens any more
        socket.create_connection((POD, workers.ingress), timeout=1).close()


def test_sigterm_stops_every_worker_gracefully(workers):
    pids = [p.pid for p in workers.workers()]
    conn = http.client.HTTPConnection(POD, workers.ingress, timeout=10)
    conn.request("GET", "/delay/0.5?t=drain")  # in flight when the SIGTERM arrives: it completes
    wait_until(lambda: workers.upstream.count("/delay/0.5?t=drain") == 1, "the request to reach the upstream")
    assert workers.proc is not None
    workers.proc.send_signal(signal.SIGTERM)
    r = conn.getresponse()
    assert r.status == 200
    r.read()
    conn.close()
    assert workers.proc.wait(20) == 0
    wait_until(lambda: not any(_alive(p) for p in pids), "the workers to exit")
    assert not os.path.exists(workers.socket)


_LINE = re.compile(r'^\[\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\] "GET /load/(\d+)/(\d+) HTTP/1\.1" 200 - 0 \d+ \d+ '
                   r'\d+ "[^"]*" "(u+)" "[0-9a-f-]{36}" "[^"]+" "[^"]+"$')


def _load(port: int, clients: int, per_client: int, agent: str) -> None:
    def client(c: int) -> None:
        conn = http.client.HTTPConnection(POD, port, timeout=20)
        for i in range(per_client):
            if i % 25 == 0:  # new connections now and then: both workers busy at once
                conn.close()
                conn = http.client.HTTPConnection(POD, port, timeout=20)
            conn.request("GET", f"/load/{c}/{i}", headers={"User-Agent": agent})
            r = conn.getresponse()
            r.read()
            assert r.status == 200
        conn.close()

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)


@pytest.mark.parametrize("where", ["pipe", "file"])
def test_access_log_lines_of_two_workers_never_interleave(tmp_path, where):
    log_path = tmp_path / "access.log"
    w = Workers(tmp_path, access_log="/dev/stdout" if where == "pipe" else str(log_path))
    w.slow_reader = True
    w.start()
    agent = "u" * 1500  # ~1.7 KB lines: two fit in PIPE_BUF, a batch of them would not
    clients, per_client = 8, 150
    try:
        _load(w.ingress, clients, per_client, agent)
        assert all(_per_worker(w.stats(), w.ingress, 2))
    finally:
        assert w.stop() == 0
    text = w.output() if where == "pipe" else log_path.read_text()
    lines = [ln for ln in text.splitlines() if not ln.startswith("sidecar")]
    seen = set()
    for ln in lines:
        m = _LINE.match(ln)
        assert m is not None and len(m.group(3)) == len(agent), f"a broken line: {ln[:200]!r}..."
        seen.add((int(m.group(1)), int(m.group(2))))
    assert len(lines) == len(seen) == clients * per_client


def test_a_port_in_use_stops_the_start_as_without_workers(tmp_path):
    w = Workers(tmp_path)
    with socket.socket() as taken:
        taken.bind((POD, w.ingress))
        taken.listen()
        proc = subprocess.run(w.argv, cwd=ROOT, capture_output=True, text=True, timeout=30,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 1
    assert "cannot listen: Address already in use" in proc.stderr


def test_a_worker_that_fails_to_start_stops_the_sidecar_with_its_code(tmp_path):
    """A certificate that does not load fails in the worker (where the listener is built): exit 2, as one process."""
    cert = tmp_path / "cert.pem"
    cert.write_text("not a certificate\n")
    port, admin = free_port(POD), free_port(POD)
    cfg = tmp_path / "tls.json"
    cfg.write_text(json.dumps({"ingress": {"port": port, "to": f"{UPSTREAM}:1", "tls": {"cert": str(cert),
                                                                                      "key": str(cert)}},
                               "admin": {"port": admin}}))
    argv = [sys.executable, "-m", "sidecar", "--config", str(cfg), "--pod-ip", POD]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    single = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=30, env=env)
    multi = subprocess.run([*argv, "--concurrency", "2"], cwd=ROOT, capture_output=True, text=True, timeout=30,
                           env=env)
    assert single.returncode == 2, single.stderr
    assert multi.returncode == 2, multi.stderr
    assert "before it was ready" in multi.stderr


# --- in a mesh ------------------------------------------------------------------------------------------------------

TOPO = """
name: {name}
pods:
  b:
    ip: 127.0.143.1
    service:
      command: [{py}, -m, services.b]
      env: {{ERROR_RATE: "0", SERVICE_PORT: "{bport}", METRICS_PORT: "{mport}"}}
      ready: {{tcp: {bport}}}
  a:
    ip: 127.0.142.1
    add_hosts: {{b.local: 127.0.0.1}}
    sidecar:
      concurrency: 2
      ingress: {{port: {iport}, to: {aport}}}
      egress:
        port: {eport}
        routes:
          - host: b.local
            to: b:{bport}
      admin: {{port: {adport}}}
    service:
      command: [{py}, -m, services.a]
      env: {{SERVICE_HOST: 127.0.0.1, SERVICE_PORT: "{aport}", METRICS_PORT: "{amport}",
             UPSTREAM_SERVICE: "http://b.local:{eport}/"}}
      ready: {{tcp: {aport}}}
"""


def test_concurrency_2_in_a_mesh(meshctl):
    ports = dict(bport=free_port("127.0.143.1"), mport=free_port("127.0.143.1"), iport=free_port("127.0.142.1"),
                 aport=free_port("127.0.142.1"), eport=free_port("127.0.142.1"), adport=free_port("127.0.142.1"),
                 amport=free_port("127.0.142.1"))
    topo = meshctl.write("w.yaml", TOPO.format(name="workers2", py=sys.executable, **ports))
    validate = meshctl("validate", str(topo), check=False)
    assert "concurrency" not in validate.stdout + validate.stderr
    meshctl.up(topo, "workers2")
    ps = meshctl.ps("workers2")
    side = next(p for p in ps["processes"] if p["replica"] == "a-0" and p["role"] == "sidecar")
    assert side["state"] == "running" and side["ready"]
    children = psutil.Process(side["pid"]).children()
    assert len(children) == 2 and all("--worker" in " ".join(c.cmdline()) for c in children)
    # ps counts the workers' memory with the sidecar's: the parent alone is one interpreter's worth.
    own = psutil.Process(side["pid"]).memory_info().rss
    assert side["rss_bytes"] >= own + sum(c.memory_info().rss for c in children) * 0.8, (side["rss_bytes"], own)
    info = json.loads(meshctl("admin", "a", "/server_info").stdout)
    assert info["command_line_options"]["concurrency"] == 2
    out = json.loads(meshctl("traffic", "a", "--n", "300", "-c", "8", "--json", "-p", "workers2").stdout)
    assert out["requests"] == 300 and out["status"] == {"200": 300}, out
    stats = json.loads(meshctl("stats", "-p", "workers2", "-o", "json", "--interval", "0.5").stdout)
    a = next(p for p in stats["pods"] if p["pod"] == "a")
    assert a["ready"] == "2/2" and a["status"] == "running"
    prom = request("127.0.142.1", ports["adport"], "/stats/prometheus").body.decode()
    total = sum(float(v) for v in re.findall(
        r'^envoy_http_downstream_rq_xx\{envoy_response_code_class="2",'
        r'envoy_http_conn_manager_prefix="ingress_http"\} (\S+)$', prom, re.M))
    assert total == 300
    meshctl("down", "-p", "workers2")
    assert not any(_alive(c.pid) for c in children)
