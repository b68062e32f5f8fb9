"""Service A and B as real processes on pod aliases 127.0.200.1-127.0.207.1.

(127.0.208.1 and 127.0.209.1 belong to test_hosts_resolver.)
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pods.atomic_file import write_atomic
from pods.hosts import HostEntry, render_hosts

ROOT = Path(__file__).resolve().parent.parent
PORT, METRICS_PORT = 18080, 18081
_PROXY_VARS = {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}


class Service:
    def __init__(self, proc: subprocess.Popen, out: Path, err: Path) -> None:
        self.proc, self.out, self.err = proc, out, err

    def stdout(self) -> str:
        return self.out.read_text()

    def stderr(self) -> str:
        return self.err.read_text()


@pytest.fixture
def spawn(tmp_path):
    started: list[subprocess.Popen] = []

    def start(module: str, *, prefix: tuple[str, ...] = (), **env: str) -> Service:
        base = {k: v for k, v in os.environ.items() if k.lower() not in _PROXY_VARS}
        n = len(started)
        out, err = tmp_path / f"{module}.{n}.out", tmp_path / f"{module}.{n}.err"
        with open(out, "wb") as fo, open(err, "wb") as fe:
            proc = subprocess.Popen(
                [*prefix, sys.executable, "-m", f"services.{module}"],
                cwd=ROOT,
                env={**base, **env},
                stdout=fo,
                stderr=fe,
            )
        started.append(proc)
        return Service(proc, out, err)

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def wait_port(service: Service, host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if service.proc.poll() is not None:
            raise AssertionError(f"exited {service.proc.returncode}: {service.stderr()}")
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"{host}:{port} not listening after {timeout}s")


def get(host: str, port: int, path: str = "/") -> tuple[int, dict[str, str], str]:
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read().decode()
    finally:
        conn.close()


def counter(host: str, port: int, name: str, status: str) -> float:
    code, _, text = get(host, port, "/metrics")
    assert code == 200
    m = re.search(rf'^{name}{{status="{status}"}} (\S+)$', text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


def start_b(spawn, alias: str, error_rate: str) -> Service:
    b = spawn("b", ERROR_RATE=error_rate, SERVICE_PORT=str(PORT), METRICS_PORT=str(METRICS_PORT), POD_IP=alias)
    wait_port(b, alias, PORT)
    wait_port(b, alias, METRICS_PORT)
    return b


def start_a(spawn, tmp_path: Path, alias: str, b_alias: str, upstream: str | None = None) -> Service:
    hosts = tmp_path / f"hosts-{alias}"
    write_atomic(hosts, render_hosts([HostEntry(b_alias, ("b.service",))], header="test pod"))
    a = spawn(
        "a",
        SERVICE_HOST="0.0.0.0",
        SERVICE_PORT=str(PORT),
        METRICS_HOST="0.0.0.0",
        METRICS_PORT=str(METRICS_PORT),
        UPSTREAM_SERVICE=upstream or f"http://b.service:{PORT}",
        POD_IP=alias,
        MESH_HOSTS=str(hosts),
    )
    wait_port(a, alias, PORT)
    wait_port(a, alias, METRICS_PORT)
    return a


def test_b_serves_yay_and_metrics_on_both_ports(spawn):
    b = start_b(spawn, "127.0.200.1", "0")
    status, headers, body = get("127.0.200.1", PORT, "/anything?x=1")
    assert status == 200
    assert headers["Content-Type"] == "text/plain; charset=utf-8"
    assert re.fullmatch(r"Service B: Yay! nounce \d+\n", body)
    assert 0 <= int(body.split()[-1]) < 2**32
    assert counter("127.0.200.1", PORT, "service_b_requests_total", "2xx") == 1
    assert counter("127.0.200.1", METRICS_PORT, "service_b_requests_total", "2xx") == 1
    time.sleep(0.1)
    line = b.stdout().splitlines()[0]
    assert re.fullmatch(r"\d{4}/\d\d/\d\d \d\d:\d\d:\d\d HTTP 200 GET /anything\?x=1 127\.0\.0\.1:\d+", line)


def test_a_through_b_success(spawn, tmp_path):
    b = start_b(spawn, "127.0.200.1", "0")
    start_a(spawn, tmp_path, "127.0.201.1", "127.0.200.1")
    a_before = counter("127.0.201.1", METRICS_PORT, "service_a_requests_total", "2xx")
    b_before = counter("127.0.200.1", METRICS_PORT, "service_b_requests_total", "2xx")
    for _ in range(5):
        status, _, body = get("127.0.201.1", PORT)
        assert status == 200
        assert re.fullmatch(r"Service A: upstream responded with: Service B: Yay! nounce \d+\n\n", body)
    assert counter("127.0.201.1", METRICS_PORT, "service_a_requests_total", "2xx") == a_before + 5
    assert counter("127.0.201.1", METRICS_PORT, "service_a_requests_total", "5xx") == 0
    assert counter("127.0.200.1", METRICS_PORT, "service_b_requests_total", "2xx") == b_before + 5
    # A calls B from its own pod alias, as a pod would from its own IP.
    time.sleep(0.1)
    assert re.search(r" HTTP 200 GET / 127\.0\.201\.1:\d+$", b.stdout(), re.MULTILINE)


def test_a_through_failing_b(spawn, tmp_path):
    start_b(spawn, "127.0.202.1", "100")
    start_a(spawn, tmp_path, "127.0.203.1", "127.0.202.1")
    for _ in range(3):
        status, headers, body = get("127.0.203.1", PORT)
        assert status == 500
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert re.fullmatch(r"Service A: upstream failed with: HTTP 500 - Service B: Ooops\.\.\. nounce \d+\n\n", body)
    assert counter("127.0.203.1", METRICS_PORT, "service_a_requests_total", "5xx") == 3
    assert counter("127.0.203.1", METRICS_PORT, "service_a_requests_total", "2xx") == 0
    assert counter("127.0.202.1", METRICS_PORT, "service_b_requests_total", "5xx") == 3


def test_a_reports_transport_errors(spawn, tmp_path):
    # Nothing listens on 127.0.205.1.
    a = start_a(spawn, tmp_path, "127.0.204.1", "127.0.205.1")
    status, _, body = get("127.0.204.1", PORT)
    assert status == 500
    assert body.startswith(f'Service A: upstream failed with: Get "http://b.service:{PORT}": ')
    assert body.endswith("\n")
    time.sleep(0.1)
    assert " HTTP 500 GET / " in a.stdout()


@pytest.mark.parametrize("value", ["abc", "", " 5", "1_0"])
def test_b_rejects_bad_error_rate(spawn, value):
    b = spawn("b", ERROR_RATE=value, SERVICE_PORT=str(PORT), POD_IP="127.0.206.1")
    assert b.proc.wait(10) == 1
    assert b.stderr().strip().endswith("Can not parse ERROR_RATE env")
    assert "Traceback" not in b.stderr()


@pytest.mark.parametrize("module", ["a", "b"])
@pytest.mark.parametrize("port", [None, "http", "70000"])
def test_bad_service_port_exits_2(spawn, module, port):
    env = {"ERROR_RATE": "0", "POD_IP": "127.0.206.1"}
    if port is not None:
        env["SERVICE_PORT"] = port
    service = spawn(module, **env)
    assert service.proc.wait(10) == 2
    assert len(service.stderr().strip().splitlines()) == 1
    assert "SERVICE_PORT" in service.stderr()


@pytest.mark.parametrize("module", ["a", "b"])
def test_port_in_use_exits_1(spawn, module):
    with socket.socket() as busy:
        busy.bind(("127.0.206.1", PORT))
        busy.listen()
        service = spawn(module, ERROR_RATE="0", SERVICE_PORT=str(PORT), POD_IP="127.0.206.1")
        assert service.proc.wait(10) == 1
    err = service.stderr().strip()
    assert len(err.splitlines()) == 1
    assert err.endswith(f"listen tcp 127.0.206.1:{PORT}: bind: address already in use")


def test_privileged_port_exits_1(spawn):
    prefix: tuple[str, ...] = ()
    if os.geteuid() == 0:
        # Root binds port 80 anyway; take the capability away as a normal user lacks it.
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv")
        prefix = (setpriv, "--inh-caps=-net_bind_service", "--bounding-set=-net_bind_service")
    else:
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.206.1", 80))
            except PermissionError:
                pass
            else:
                pytest.skip("unprivileged users may bind port 80 here")
    service = spawn("b", prefix=prefix, ERROR_RATE="0", SERVICE_PORT="80", POD_IP="127.0.206.1")
    assert service.proc.wait(10) == 1
    assert service.stderr().strip().endswith("listen tcp 127.0.206.1:80: bind: permission denied")


@pytest.mark.parametrize("module", ["a", "b"])
def test_sigterm_exits_0_promptly(spawn, tmp_path, module):
    if module == "b":
        service = start_b(spawn, "127.0.207.1", "0")
    else:
        service = start_a(spawn, tmp_path, "127.0.207.1", "127.0.205.1")
    # An idle keep-alive client must not hold the shutdown up.
    conn = http.client.HTTPConnection("127.0.207.1", PORT, timeout=5)
    conn.request("GET", "/metrics")
    conn.getresponse().read()
    try:
        started = time.monotonic()
        service.proc.send_signal(signal.SIGTERM)
        assert service.proc.wait(2) == 0
        assert time.monotonic() - started < 2
        assert "Traceback" not in service.stderr()
    finally:
        conn.close()


def test_a_honours_http_proxy(spawn, tmp_path):
    # B happily serves absolute-form proxy requests, so it can stand in for the
    # egress proxy; nowhere.service resolves nowhere, so only the proxy path works.
    b = start_b(spawn, "127.0.200.1", "0")
    hosts = tmp_path / "empty-hosts"
    write_atomic(hosts, "")
    a = spawn(
        "a",
        SERVICE_PORT=str(PORT),
        UPSTREAM_SERVICE=f"http://nowhere.service:{PORT}/via-proxy",
        HTTP_PROXY=f"http://127.0.200.1:{PORT}",
        POD_IP="127.0.201.1",
        MESH_HOSTS=str(hosts),
    )
    wait_port(a, "127.0.201.1", PORT)
    status, _, body = get("127.0.201.1", PORT)
    assert status == 200, body
    time.sleep(0.1)
    assert "/via-proxy 127.0.201.1:" in b.stdout()


def test_a_honours_no_proxy(spawn, tmp_path):
    start_b(spawn, "127.0.200.1", "0")
    hosts = tmp_path / "hosts"
    write_atomic(hosts, "127.0.200.1 b.service\n")
    a = spawn(
        "a",
        SERVICE_PORT=str(PORT),
        UPSTREAM_SERVICE=f"http://b.service:{PORT}/",
        HTTP_PROXY="http://127.0.205.1:1",  # dead: using it would fail the request
        NO_PROXY="b.service",
        POD_IP="127.0.201.1",
        MESH_HOSTS=str(hosts),
    )
    wait_port(a, "127.0.201.1", PORT)
    assert get("127.0.201.1", PORT)[0] == 200
