"""The sidecar proxy end to end: a real ``python -m sidecar`` process between real sockets.

Addresses: 127.0.150.1 - 127.0.169.1 only. The main sidecar (pod 127.0.150.1) has one egress route per
scenario, each to its own upstream address (so each cluster's stats belong to one test and can be asserted
exactly); scripted upstreams (``tests/upstreams.py``) listen on 127.0.151.x / 127.0.152.x.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from meshctl.client import UnixHTTPConnection
from tests.conftest import require_ports, terminate
from tests.upstreams import CHUNKED_BODY, CLOSE_BODY, UpstreamServer

ROOT = Path(__file__).resolve().parent.parent

POD = "127.0.150.1"
CLIENT_IP = "127.0.150.9"  # tests that check x-forwarded-for connect from here
INGRESS = 18080
EGRESS = 19001
ADMIN = 19901
UP_PORT = 18000
LOCAL_SERVICE = (POD, UP_PORT)
LB_IPS = ("127.0.152.1", "127.0.152.2")

RESET_PREFIX = b"upstream connect error or disconnect/reset before headers"


def up(n: int) -> str:
    return f"127.0.151.{n}"


def upa(n: int) -> str:
    return f"{up(n)}:{UP_PORT}"


# Upstream address per scenario (the cluster is named after it).
U_5XX, U_GW, U_4XX, U_CODES, U_RESET, U_CONNFAIL, U_DEFAULT, U_PERTRY, U_TIMEOUT, U_NONE, U_CB, U_B, U_BIG, \
    U_REUSE, U_HDR = range(1, 16)

EGRESS_ROUTES: list[dict[str, Any]] = [
    {"host": "rt-5xx.svc", "to": upa(U_5XX), "retry_policy": {"retry_on": "5xx", "num_retries": 2}},
    {"host": "rt-gw.svc", "to": upa(U_GW), "retry_policy": {"retry_on": "gateway-error", "num_retries": 2}},
    {"host": "rt-4xx.svc", "to": upa(U_4XX), "retry_policy": {"retry_on": "retriable-4xx", "num_retries": 2}},
    {"host": "rt-codes.svc", "to": upa(U_CODES),
     "retry_policy": {"retry_on": "retriable-status-codes", "retriable_status_codes": [418], "num_retries": 2}},
    {"host": "rt-reset.svc", "to": upa(U_RESET), "retry_policy": {"retry_on": "reset", "num_retries": 2}},
    {"host": "rt-connfail.svc", "to": upa(U_CONNFAIL), "connect_timeout": "0.25s",
     "retry_policy": {"retry_on": "connect-failure", "num_retries": 2}},
    {"host": "rt-default.svc", "to": upa(U_DEFAULT), "retry_policy": {"retry_on": "5xx"}},
    {"host": "rt-pertry.svc", "to": upa(U_PERTRY),
     "retry_policy": {"retry_on": "5xx", "num_retries": 1, "per_try_timeout": "0.2s"}},
    {"host": "rt-timeout.svc", "to": upa(U_TIMEOUT), "timeout": "0.3s"},
    {"host": "rt-none.svc", "to": upa(U_NONE)},
    {"host": "rt-cb.svc", "to": upa(U_CB), "retry_policy": {"retry_on": "5xx", "num_retries": 2},
     "circuit_breakers": {"max_retries": 0}},
    {"host": "b.local.service", "to": upa(U_B)},
    {"host": "rt-big.svc", "to": upa(U_BIG), "retry_policy": {"retry_on": "5xx", "num_retries": 2}},
    {"host": "reuse.svc", "to": upa(U_REUSE)},
    {"host": "hdr.svc", "to": upa(U_HDR)},
    {"host": "lb-rr.pod", "to": f"lb-rr.pod:{UP_PORT}", "lb_policy": "round_robin"},
    {"host": "lb-rand.pod", "to": f"lb-rand.pod:{UP_PORT}", "lb_policy": "random"},
    {"host": "lb-lr.pod", "to": f"lb-lr.pod:{UP_PORT}", "lb_policy": "least_request"},
]


def cl(n: int) -> str:
    """Stat prefix of the cluster for upstream n."""
    return f"cluster.{up(n)}."


# --- processes --------------------------------------------------------------------------------------------------


class SidecarProc:
    """One real sidecar subprocess; stopped (SIGTERM, then kill) by ``stop``."""

    def __init__(self, workdir: Path, pod_ip: str, admin_port: int, *, config: dict | None = None,
                 envoy: str | None = None, hosts: str | None = None, admin_socket: bool = False) -> None:
        self.workdir = workdir
        self.pod_ip = pod_ip
        self.admin_port = admin_port
        workdir.mkdir(parents=True, exist_ok=True)
        self.args = [sys.executable, "-m", "sidecar", "--pod-ip", pod_ip]
        self.admin_socket = str(workdir / "admin.sock") if admin_socket else None
        if self.admin_socket:
            self.args += ["--admin-socket", self.admin_socket]
        if envoy is not None:
            self.args += ["--envoy", envoy]
        else:
            cfg = workdir / "sidecar.json"
            cfg.write_text(json.dumps(config))
            self.args += ["--config", str(cfg)]
        if hosts is not None:
            hf = workdir / "hosts"
            hf.write_text(hosts)
            self.args += ["--hosts", str(hf)]
        self.stdout_path = workdir / "stdout.log"
        self.stderr_path = workdir / "stderr.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> SidecarProc:
        env = {k: v for k, v in os.environ.items() if k not in ("MESH_HOSTS", "POD_IP")}
        env["PYTHONPATH"] = str(ROOT)
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(self.args, cwd=ROOT, stdout=out, stderr=err, env=env)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"sidecar exited {self.proc.returncode}: {self.stderr()}")
            try:
                r = request(self.pod_ip, self.admin_port, "/ready", timeout=1)
                if r.status == 200 and r.body.strip() == b"LIVE":
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise AssertionError(f"sidecar not ready in 15 s: {self.stderr()}")

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> int | None:
        return terminate(self.proc)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


# --- clients ----------------------------------------------------------------------------------------------------


@dataclass
class Resp:
    status: int
    headers: dict[str, str]  # lower-case names, last value wins
    body: bytes
    elapsed: float

    def json(self) -> Any:
        return json.loads(self.body)


def request(ip: str, port: int, path: str, *, host: str | None = None, method: str = "GET",
            headers: dict[str, str] | None = None, body: Any = None, timeout: float = 10,
            source: str | None = None, encode_chunked: bool = False) -> Resp:
    conn = http.client.HTTPConnection(ip, port, timeout=timeout,
                                      source_address=(source, 0) if source else None)
    hdrs = {"Host": host or f"{ip}:{port}", **(headers or {})}
    t0 = time.monotonic()
    try:
        conn.request(method, path, body=body, headers=hdrs, encode_chunked=encode_chunked)
        r = conn.getresponse()
        data = r.read()
        return Resp(r.status, {k.lower(): v for k, v in r.getheaders()}, data, time.monotonic() - t0)
    finally:
        conn.close()


def egress(host: str, path: str, **kw: Any) -> Resp:
    return request(POD, EGRESS, path, host=host, **kw)


def admin_get(path: str, *, ip: str = POD, port: int = ADMIN, method: str = "GET") -> Resp:
    return request(ip, port, path, method=method)


def admin_socket_request(sock_path: str, path: str, method: str = "GET", timeout: float = 10) -> Resp:
    """One request on the admin Unix socket (``--admin-socket``)."""
    conn = UnixHTTPConnection(sock_path, timeout)
    t0 = time.monotonic()
    try:
        conn.request(method, path)
        r = conn.getresponse()
        data = r.read()
        return Resp(r.status, {k.lower(): v for k, v in r.getheaders()}, data, time.monotonic() - t0)
    finally:
        conn.close()


def raw_exchange(ip: str, port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send bytes, read until the server closes (bounded by ``timeout``)."""
    out = bytearray()
    with socket.create_connection((ip, port), timeout=timeout) as s:
        s.sendall(data)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break
            except ConnectionResetError:
                break
            if not chunk:
                break
            out += chunk
    return bytes(out)


def read_response(f: Any) -> tuple[int, dict[str, str], bytes]:
    """Parse one HTTP/1.1 response (content-length or chunked) from a buffered socket file."""
    status_line = f.readline()
    assert status_line.startswith(b"HTTP/1.1 "), status_line
    status = int(status_line.split()[1])
    headers: dict[str, str] = {}
    while True:
        line = f.readline()
        assert line, "connection closed inside the response head"
        if line in (b"\r\n", b"\n"):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        body = f.read(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        parts = []
        while True:
            size = int(f.readline().split(b";")[0], 16)
            if size == 0:
                f.readline()
                break
            parts.append(f.read(size))
            f.readline()
        body = b"".join(parts)
    else:
        body = f.read()
    return status, headers, body


def stats(ip: str = POD, port: int = ADMIN) -> dict[str, int]:
    r = admin_get("/stats?format=json", ip=ip, port=port)
    assert r.status == 200
    return {s["name"]: s["value"] for s in r.json()["stats"] if "name" in s}


def stat(name: str, ip: str = POD, port: int = ADMIN) -> int:
    return stats(ip, port).get(name, 0)


LOG_RE = re.compile(
    r'^\[(?P<start>[^\]]+)\] "(?P<method>\S+) (?P<path>\S+) (?P<protocol>\S+)" (?P<code>\d+) (?P<flags>\S+) '
    r'(?P<rx>\d+) (?P<tx>\d+) (?P<duration>\d+) (?P<ust>\S+) "(?P<xff>[^"]*)" "(?P<ua>[^"]*)" '
    r'"(?P<rid>[^"]*)" "(?P<authority>[^"]*)" "(?P<upstream>[^"]*)"$')


def log_lines(path: Path) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()
    except OSError:
        return []


def wait_log(path: Path, needle: str, timeout: float = 3.0) -> dict[str, str]:
    """The parsed access log line whose request path contains ``needle``."""
    deadline = time.monotonic() + timeout
    while True:
        for line in log_lines(path):
            m = LOG_RE.match(line)
            if m and needle in m.group("path"):
                return m.groupdict()
        if time.monotonic() > deadline:
            raise AssertionError(f"no access log line for {needle!r} in {path}:\n" + "\n".join(log_lines(path)[-20:]))
        time.sleep(0.05)


def flags(line: dict[str, str]) -> set[str]:
    return set() if line["flags"] == "-" else set(line["flags"].split(","))


def tag() -> str:
    return uuid.uuid4().hex[:12]


def wait_count(upstream: UpstreamServer, target: str, n: int, timeout: float = 2.0) -> int:
    """Upstream requests for target, waiting (bounded) until at least n arrived."""
    deadline = time.monotonic() + timeout
    while upstream.count(target) < n and time.monotonic() < deadline:
        time.sleep(0.02)
    return upstream.count(target)


# --- fixtures ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sidecar_proxy")


@pytest.fixture(scope="module")
def upstream() -> Iterator[UpstreamServer]:
    addrs = [LOCAL_SERVICE] + [(up(n), UP_PORT) for n in range(1, 16) if n != U_CONNFAIL]
    addrs += [(ip, UP_PORT) for ip in LB_IPS]
    server = UpstreamServer(addrs).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def access_log(workdir: Path) -> Path:
    return workdir / "main" / "access.log"


@pytest.fixture(scope="module")
def sidecar(workdir: Path, upstream: UpstreamServer, access_log: Path) -> Iterator[SidecarProc]:
    config = {
        "admin": {"port": ADMIN},
        "access_log": str(access_log),
        "ingress": {"port": INGRESS, "to": UP_PORT},
        "egress": {"port": EGRESS, "routes": EGRESS_ROUTES},
    }
    hosts = "".join(f"{ip}\tlb-rr.pod lb-rand.pod lb-lr.pod\n" for ip in LB_IPS)
    sc = SidecarProc(workdir / "main", POD, ADMIN, config=config, hosts=hosts, admin_socket=True)
    sc.start()
    yield sc
    sc.stop()


@pytest.fixture
def alive(sidecar: SidecarProc) -> Iterator[SidecarProc]:
    """The main sidecar, checked to still be alive and serving after the test."""
    yield sidecar
    assert sidecar.alive(), f"sidecar died: {sidecar.stderr()[-3000:]}"
    assert admin_get("/ready").status == 200


# --- 1. retry_on conditions ---------------------------------------------------------------------------------------


def test_retry_on_5xx(alive, upstream, access_log):
    key = tag()
    r = egress("rt-5xx.svc", f"/flaky/{key}/1/503")
    assert r.status == 200, r.body
    assert upstream.keys[key] == 2
    s = stats()
    p = cl(U_5XX)
    assert s[p + "upstream_rq_retry"] == 1
    assert s[p + "retry.upstream_rq_503"] == 1
    assert s[p + "upstream_rq_200"] == 1
    assert s[p + "upstream_rq_retry_success"] == 1
    assert s.get(p + "upstream_rq_retry_limit_exceeded", 0) == 0
    line = wait_log(access_log, key)
    assert line["code"] == "200" and flags(line) == set()


def test_retry_on_gateway_error(alive, upstream):
    key = tag()
    r = egress("rt-gw.svc", f"/flaky/{key}/1/502")
    assert r.status == 200
    assert upstream.keys[key] == 2
    t = f"/status/500?t={tag()}"
    r = egress("rt-gw.svc", t)
    assert r.status == 500
    assert upstream.count(t) == 1
    s = stats()
    p = cl(U_GW)
    assert s[p + "upstream_rq_retry"] == 1
    assert s[p + "retry.upstream_rq_502"] == 1
    assert s[p + "upstream_rq_500"] == 1
    assert s.get(p + "retry.upstream_rq_500", 0) == 0


def test_retry_on_retriable_4xx(alive, upstream):
    key = tag()
    r = egress("rt-4xx.svc", f"/flaky/{key}/1/409")
    assert r.status == 200
    assert upstream.keys[key] == 2
    t = f"/status/404?t={tag()}"
    r = egress("rt-4xx.svc", t)
    assert r.status == 404
    assert upstream.count(t) == 1
    t5 = f"/status/503?t={tag()}"
    assert egress("rt-4xx.svc", t5).status == 503
    assert upstream.count(t5) == 1  # retriable-4xx is 409 only
    s = stats()
    assert s[cl(U_4XX) + "upstream_rq_retry"] == 1
    assert s[cl(U_4XX) + "retry.upstream_rq_409"] == 1


def test_retry_on_retriable_status_codes(alive, upstream):
    key = tag()
    r = egress("rt-codes.svc", f"/flaky/{key}/2/418")
    assert r.status == 200
    assert upstream.keys[key] == 3
    t = f"/status/503?t={tag()}"
    assert egress("rt-codes.svc", t).status == 503
    assert upstream.count(t) == 1
    s = stats()
    assert s[cl(U_CODES) + "upstream_rq_retry"] == 2
    assert s[cl(U_CODES) + "retry.upstream_rq_418"] == 2


def test_retry_on_reset(alive, upstream, access_log):
    t = f"/reset-before-headers?t={tag()}"
    r = egress("rt-reset.svc", t)
    assert r.status == 503
    assert r.body.startswith(RESET_PREFIX), r.body
    assert wait_count(upstream, t, 3) == 3  # 1 + num_retries 2
    line = wait_log(access_log, t)
    assert line["code"] == "503"
    assert flags(line) == {"UC", "URX"}, line
    s = stats()
    assert s[cl(U_RESET) + "upstream_rq_retry"] == 2
    assert s[cl(U_RESET) + "upstream_rq_retry_limit_exceeded"] == 1
    # 5xx is not a reset: not retried under retry_on: reset
    t5 = f"/status/503?t={tag()}"
    assert egress("rt-reset.svc", t5).status == 503
    assert upstream.count(t5) == 1


def test_retry_on_connect_failure(alive, access_log):
    t = f"/?t={tag()}"
    started = time.monotonic()
    r = egress("rt-connfail.svc", t)
    assert r.status == 503
    assert r.body.startswith(RESET_PREFIX), r.body
    assert time.monotonic() - started < 2.0
    line = wait_log(access_log, t)
    assert "UF" in flags(line), line
    assert flags(line) <= {"UF", "URX"}
    assert line["upstream"] == upa(U_CONNFAIL)
    s = stats()
    assert s[cl(U_CONNFAIL) + "upstream_cx_connect_fail"] == 3
    assert s[cl(U_CONNFAIL) + "upstream_rq_retry"] == 2


# --- 2. default num_retries, limit exceeded ---------------------------------------------------------------------


def test_default_num_retries_and_limit_exceeded(alive, upstream, access_log):
    t = f"/status/503?t={tag()}"
    r = egress("rt-default.svc", t)
    assert r.status == 503
    assert r.body == b"status 503\n"  # the upstream's own reply is passed through
    assert upstream.count(t) == 2  # default num_retries: 1
    line = wait_log(access_log, t)
    assert line["code"] == "503"
    assert flags(line) == {"URX"}, line
    s = stats()
    p = cl(U_DEFAULT)
    assert s[p + "upstream_rq_retry"] == 1
    assert s[p + "upstream_rq_retry_limit_exceeded"] == 1
    assert s[p + "retry.upstream_rq_503"] == 1
    assert s[p + "upstream_rq_503"] == 1
    assert s.get(p + "upstream_rq_retry_success", 0) == 0


# --- 3. timeouts --------------------------------------------------------------------------------------------------


def test_per_try_timeout(alive, upstream, access_log):
    t = f"/delay/2?t={tag()}"
    r = egress("rt-pertry.svc", t)
    assert r.status == 504
    assert r.body == b"upstream request timeout"
    assert 0.35 <= r.elapsed < 1.5, r.elapsed
    assert wait_count(upstream, t, 2) == 2
    line = wait_log(access_log, t)
    assert "UT" in flags(line), line
    s = stats()
    assert s[cl(U_PERTRY) + "upstream_rq_per_try_timeout"] == 2
    assert s[cl(U_PERTRY) + "upstream_rq_retry"] == 1


def test_route_timeout(alive, upstream, access_log):
    t = f"/delay/2?t={tag()}"
    r = egress("rt-timeout.svc", t)
    assert r.status == 504
    assert r.body == b"upstream request timeout"
    assert 0.25 <= r.elapsed < 1.5, r.elapsed
    assert upstream.count(t) == 1
    line = wait_log(access_log, t)
    assert flags(line) == {"UT"}, line
    s = stats()
    assert s[cl(U_TIMEOUT) + "upstream_rq_timeout"] == 1
    assert s.get(cl(U_TIMEOUT) + "upstream_rq_retry", 0) == 0


# --- 4. request headers that steer the router -------------------------------------------------------------------


@pytest.mark.parametrize("order", ["retry_on_first", "max_retries_first"])
def test_header_retry_on_and_max_retries(alive, upstream, order):
    key = tag()
    hdrs = [("x-envoy-retry-on", "5xx"), ("x-envoy-max-retries", "3")]
    if order == "max_retries_first":
        hdrs.reverse()
    target = f"/flaky/{key}/3/503"
    r = egress("hdr.svc", target, headers=dict(hdrs))
    assert r.status == 200, f"{r.status} after {upstream.keys[key]} upstream attempts"
    assert upstream.keys[key] == 4
    seen = upstream.requests_for(target)
    # Envoy sends x-envoy-attempt-count only with include_request_attempt_count (not in the short form)
    assert [x.header("x-envoy-attempt-count") for x in seen] == [None] * 4
    for x in seen:  # control headers are consumed by the proxy
        assert x.header("x-envoy-retry-on") is None and x.header("x-envoy-max-retries") is None


def test_no_retry_without_policy_or_header(alive, upstream):
    t = f"/status/503?t={tag()}"
    assert egress("hdr.svc", t).status == 503
    assert upstream.count(t) == 1
    assert upstream.requests_for(t)[0].header("x-envoy-attempt-count") is None


def test_header_upstream_rq_timeout_ms(alive, upstream, access_log):
    t = f"/delay/2?t={tag()}"
    r = egress("hdr.svc", t, headers={"x-envoy-upstream-rq-timeout-ms": "200"})
    assert r.status == 504
    assert 0.15 <= r.elapsed < 1.0, r.elapsed
    assert upstream.count(t) == 1
    assert upstream.requests_for(t)[0].header("x-envoy-upstream-rq-timeout-ms") is None
    assert upstream.requests_for(t)[0].header("x-envoy-expected-rq-timeout-ms") == "200"
    assert "UT" in flags(wait_log(access_log, t))


def test_header_per_try_timeout_ms(alive, upstream, access_log):
    t = f"/delay/2?t={tag()}"
    r = egress("hdr.svc", t, headers={"x-envoy-retry-on": "5xx", "x-envoy-upstream-rq-per-try-timeout-ms": "150"})
    assert r.status == 504
    assert r.body == b"upstream request timeout"
    assert 0.25 <= r.elapsed < 1.2, r.elapsed
    assert wait_count(upstream, t, 2) == 2  # header retry-on without max-retries: 1 retry
    assert "UT" in flags(wait_log(access_log, t))


# --- 5. circuit breaker on retries ------------------------------------------------------------------------------


def test_retry_circuit_breaker_overflow(alive, upstream):
    t = f"/status/503?t={tag()}"
    r = egress("rt-cb.svc", t)
    assert r.status == 503
    assert upstream.count(t) == 1
    s = stats()
    assert s[cl(U_CB) + "upstream_rq_retry_overflow"] == 1
    assert s.get(cl(U_CB) + "upstream_rq_retry", 0) == 0


# --- 6. reset after the response head ---------------------------------------------------------------------------


def test_reset_mid_response(alive, upstream, access_log):
    t = f"/reset-mid-body?t={tag()}"
    data = raw_exchange(POD, EGRESS, f"GET {t} HTTP/1.1\r\nHost: rt-none.svc\r\n\r\n".encode())
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), data[:200]
    assert b"content-length: 1000" in head.lower()
    assert body == b"0123456789"  # truncated: then the connection was closed
    line = wait_log(access_log, t)
    assert "UPE" in flags(line), line  # Envoy 1.40: a body cut short is an upstream protocol error
    r = egress("rt-none.svc", f"/echo?t={tag()}")
    assert r.status == 200


# --- 7. header handling -----------------------------------------------------------------------------------------


def test_hop_by_hop_and_forwarding_headers(alive, upstream):
    t = f"/echo?t={tag()}"
    sent = {
        "Connection": "keep-alive, X-Hop-Custom",
        "Keep-Alive": "timeout=5",
        "TE": "trailers",
        "Upgrade": "h2c",
        "Proxy-Authorization": "Basic Zm9vOmJhcg==",
        "X-Hop-Custom": "secret",
        "X-End-To-End": "kept",
        "X-Forwarded-For": "10.1.2.3",
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "b3": "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90",
    }
    r = egress("b.local.service", t, headers=sent, source=CLIENT_IP)
    assert r.status == 200
    got = upstream.requests_for(t)[0]
    for name in ("connection", "keep-alive", "upgrade", "proxy-authorization", "x-hop-custom"):
        assert got.header(name) is None, f"{name} forwarded: {got.headers}"
    assert got.header("te") == "trailers"  # the one TE value Envoy forwards
    assert got.header("x-end-to-end") == "kept"
    assert got.header_all("x-forwarded-for") == [f"10.1.2.3,{CLIENT_IP}"]  # Envoy appends with a bare comma
    assert got.header("traceparent") == sent["traceparent"]
    assert got.header("b3") == sent["b3"]
    rid = got.header("x-request-id")
    assert rid is not None and uuid.UUID(rid).version == 4
    assert re.fullmatch(r"\d+", r.headers.get("x-envoy-upstream-service-time", "")), r.headers
    # a caller's request id is kept
    t2 = f"/echo?t={tag()}"
    egress("b.local.service", t2, headers={"x-request-id": "keep-me-123"})
    assert upstream.requests_for(t2)[0].header_all("x-request-id") == ["keep-me-123"]
    # no x-forwarded-for: one is added with the client address
    t3 = f"/echo?t={tag()}"
    egress("b.local.service", t3, source=CLIENT_IP)
    assert upstream.requests_for(t3)[0].header_all("x-forwarded-for") == [CLIENT_IP]


def test_response_hop_by_hop_headers_stripped(alive):
    with socket.create_connection((POD, EGRESS), timeout=5) as s:
        f = s.makefile("rb")
        s.sendall(f"GET /hop-response?t={tag()} HTTP/1.1\r\nHost: b.local.service\r\n\r\n".encode())
        status, headers, body = read_response(f)
        assert status == 200 and body == b"hop\n"
        for name in ("keep-alive", "x-resp-hop", "proxy-authenticate"):
            assert name not in headers, headers
        assert headers.get("connection", "keep-alive").lower() != "close"
        assert headers["x-end-to-end"] == "kept"
        # the client connection stays usable
        s.sendall(f"GET /echo?t={tag()} HTTP/1.1\r\nHost: b.local.service\r\n\r\n".encode())
        assert read_response(f)[0] == 200


# --- 8. host routing ---------------------------------------------------------------------------------------------


def test_host_routing_and_no_route(alive, upstream, access_log):
    t = f"/echo?t={tag()}"
    r = egress("b.local.service:9001", t)
    assert r.status == 200
    assert r.json()["server"] == upa(U_B)
    assert egress("B.Local.Service", f"/echo?t={tag()}").json()["server"] == upa(U_B)
    before = stat("http.egress_http.no_route")
    t404 = f"/echo?t={tag()}"
    r = egress("unknown.svc", t404)
    assert r.status == 404
    assert upstream.count(t404) == 0
    assert stat("http.egress_http.no_route") == before + 1
    line = wait_log(access_log, t404)
    assert line["code"] == "404" and flags(line) == {"NR"}
    # the ingress has a catch-all virtual host to the pod's own service
    r = request(POD, INGRESS, f"/echo?t={tag()}", host="anything.example")
    assert r.status == 200 and r.json()["server"] == f"{POD}:{UP_PORT}"


# --- 9. absolute-form requests (HTTP_PROXY use) -------------------------------------------------------------------


def test_absolute_form_raw(alive, upstream):
    t = f"/echo?t={tag()}"
    with socket.create_connection((POD, EGRESS), timeout=5) as s:
        s.sendall(f"GET http://b.local.service{t} HTTP/1.1\r\nHost: wrong.example\r\n\r\n".encode())
        status, _, body = read_response(s.makefile("rb"))
    assert status == 200
    doc = json.loads(body)
    assert doc["server"] == upa(U_B)
    assert doc["path"] == t  # origin form upstream
    got = upstream.requests_for(t)[0]
    assert got.header_all("host") == ["b.local.service"]
    # with a port: matched by the b.local.service:* domain, Host forwarded with the port
    t2 = f"/echo?t={tag()}"
    with socket.create_connection((POD, EGRESS), timeout=5) as s:
        s.sendall(f"GET http://b.local.service:9001{t2} HTTP/1.1\r\nHost: wrong.example\r\n\r\n".encode())
        status, _, body = read_response(s.makefile("rb"))
    assert status == 200 and json.loads(body)["path"] == t2
    assert upstream.requests_for(t2)[0].header_all("host") == ["b.local.service:9001"]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_absolute_form_curl_proxy(alive, upstream):
    t = f"/echo?t={tag()}"
    out = subprocess.run(["curl", "-s", "-m", "5", "-x", f"http://{POD}:{EGRESS}", f"http://b.local.service{t}"],
                         capture_output=True, timeout=10)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["path"] == t and doc["server"] == upa(U_B)
    got = upstream.requests_for(t)[0]
    assert got.header("proxy-connection") is None


# --- 10. bodies ---------------------------------------------------------------------------------------------------


def test_post_content_length_body(alive, upstream):
    t = f"/echo?t={tag()}"
    r = egress("b.local.service", t, method="POST", body=b"x" * 5000)
    assert r.status == 200, r.body
    assert r.json()["body_length"] == 5000
    # framed exactly once: a repeated content-length is rejected by strict servers (nginx, llhttp)
    assert upstream.requests_for(t)[0].header_all("content-length") == ["5000"]


def test_post_chunked_body(alive, upstream):
    t = f"/echo?t={tag()}"
    r = egress("b.local.service", t, method="POST", body=iter([b"a" * 1000, b"b" * 2345, b"c"]),
               encode_chunked=True)
    assert r.status == 200, r.body
    assert r.json()["body_length"] == 3346
    assert r.json()["method"] == "POST"
    got = upstream.requests_for(t)[0]
    assert got.header_all("content-length") + got.header_all("transfer-encoding") in (["3346"], ["chunked"])


def test_chunked_and_close_delimited_responses(alive):
    r = egress("b.local.service", f"/chunked?t={tag()}")
    assert r.status == 200 and r.body == CHUNKED_BODY
    r = egress("b.local.service", f"/close-delimited?t={tag()}")
    assert r.status == 200 and r.body == CLOSE_BODY
    # and over one keep-alive connection, both in a row, then a normal one
    with socket.create_connection((POD, EGRESS), timeout=5) as s:
        f = s.makefile("rb")
        for path, want in (("/chunked", CHUNKED_BODY), ("/close-delimited", CLOSE_BODY)):
            s.sendall(f"GET {path}?t={tag()} HTTP/1.1\r\nHost: b.local.service\r\n\r\n".encode())
            status, _, body = read_response(f)
            assert status == 200 and body == want
        s.sendall(f"GET /echo?t={tag()} HTTP/1.1\r\nHost: b.local.service\r\n\r\n".encode())
        assert read_response(f)[0] == 200


def test_head_request_keeps_connection_usable(alive):
    t = f"/plain?t={tag()}"
    with socket.create_connection((POD, EGRESS), timeout=3) as s:
        f = s.makefile("rb")
        s.sendall(f"GET {t} HTTP/1.1\r\nHost: b.local.service\r\n\r\n".encode())
        _, get_headers, get_body = read_response(f)
        assert get_headers["content-length"] == str(len(get_body))
        s.sendall(f"HEAD {t} HTTP/1.1\r\nHost: b.local.service\r\n\r\n".encode())
        status_line = f.readline()
        assert status_line.startswith(b"HTTP/1.1 200"), status_line
        head: dict[str, str] = {}
        while (line := f.readline()) not in (b"\r\n", b""):
            n, _, v = line.decode().partition(":")
            head[n.strip().lower()] = v.strip()
        assert head.get("content-length") == get_headers["content-length"], head
        # no body follows a HEAD response: the next response starts right here, without waiting
        s.sendall(f"GET /echo?t={tag()} HTTP/1.1\r\nHost: b.local.service\r\n\r\n".encode())
        try:
            status, _, _ = read_response(f)
        except TimeoutError:
            raise AssertionError("the request after a HEAD got no response in 3 s (HEAD never completed)") from None
        assert status == 200


def test_http10_client_gets_unchunked_body(alive, access_log):
    t = f"/chunked?t={tag()}"
    data = raw_exchange(POD, EGRESS, f"GET {t} HTTP/1.0\r\nHost: b.local.service\r\n\r\n".encode())
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), data[:200]
    assert b"transfer-encoding" not in head.lower()
    assert body == CHUNKED_BODY
    assert wait_log(access_log, t)["protocol"] == "HTTP/1.0"


BIG = os.urandom(3 * 1024 * 1024)


def _big_body(framing: str) -> tuple[Any, bool]:
    if framing == "chunked":
        return iter([BIG[i:i + 256 * 1024] for i in range(0, len(BIG), 256 * 1024)]), True
    return BIG, False


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_large_body_streamed(alive, upstream, framing):
    body, chunked = _big_body(framing)
    r = egress("b.local.service", f"/echo?t={tag()}", method="POST", body=body, encode_chunked=chunked, timeout=20)
    assert r.status == 200, r.body
    assert r.json()["body_length"] == len(BIG)
    assert r.json()["body_sha256"] == hashlib.sha256(BIG).hexdigest()


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_large_body_not_retried(alive, upstream, framing):
    body, chunked = _big_body(framing)
    t = f"/status/503?t={tag()}"
    r = egress("rt-big.svc", t, method="POST", body=body, encode_chunked=chunked, timeout=20)
    assert r.status == 503
    assert r.body == b"status 503\n", r.body
    assert upstream.count(t) == 1
    assert upstream.requests_for(t)[0].body_length == len(BIG)


def test_small_body_replayed_on_retry(alive, upstream):
    key = tag()
    r = egress("rt-big.svc", f"/flaky/{key}/1/503", method="POST", body=iter([b"y" * 1000]), encode_chunked=True)
    assert r.status == 200
    assert [x.body_length for x in upstream.requests_for(f"/flaky/{key}/1/503")] == [1000, 1000]


# --- 11. malformed requests ---------------------------------------------------------------------------------------


def test_garbage_request_400(alive, access_log):
    data = raw_exchange(POD, EGRESS, b"\x16\x03\x01\x02\x00\x01\x00 garbage\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 400"), data[:200]
    assert b"connection: close" in data.lower()
    assert egress("b.local.service", f"/echo?t={tag()}").status == 200


def test_content_length_with_transfer_encoding_400(alive, upstream):
    t = f"/echo?t={tag()}"
    smuggle = (f"POST {t} HTTP/1.1\r\nHost: b.local.service\r\nContent-Length: 5\r\n"
               "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n").encode()
    data = raw_exchange(POD, EGRESS, smuggle)
    assert data.startswith(b"HTTP/1.1 400"), data[:200]
    assert upstream.count(t) == 0
    assert egress("b.local.service", f"/echo?t={tag()}").status == 200


def test_headers_too_large_431(alive, upstream, access_log):
    t = f"/echo?t={tag()}"
    huge = f"GET {t} HTTP/1.1\r\nHost: b.local.service\r\nX-Big: {'a' * 70 * 1024}\r\n\r\n".encode()
    data = raw_exchange(POD, EGRESS, huge)
    assert data.startswith(b"HTTP/1.1 431"), data[:200]
    assert upstream.count(t) == 0
    assert egress("b.local.service", f"/echo?t={tag()}").status == 200


def test_uri_too_long_414(alive, upstream):
    t = f"/echo?t={'u' * 20 * 1024}"
    data = raw_exchange(POD, EGRESS, f"GET {t} HTTP/1.1\r\nHost: b.local.service\r\n\r\n".encode())
    assert data.startswith(b"HTTP/1.1 414"), data[:200]
    assert upstream.count(t) == 0
    assert egress("b.local.service", f"/echo?t={tag()}").status == 200


def test_upstream_garbage_reply(alive, access_log):
    t = f"/garbage?t={tag()}"
    r = egress("rt-none.svc", t)
    assert r.status == 503
    assert r.body.startswith(RESET_PREFIX)
    line = wait_log(access_log, t)
    assert flags(line) == {"UPE"}, line


# --- 12. keep-alive, pipelining, upstream connection reuse --------------------------------------------------------


def test_pipelining_in_order(alive):
    paths = [f"/delay/0.2?t={tag()}", f"/echo?t={tag()}", f"/echo?t={tag()}"]
    with socket.create_connection((POD, EGRESS), timeout=5) as s:
        s.sendall(b"".join(f"GET {p} HTTP/1.1\r\nHost: b.local.service\r\n\r\n".encode() for p in paths))
        f = s.makefile("rb")
        first = read_response(f)
        assert first[0] == 200 and first[2] == b"delayed\n"
        for p in paths[1:]:
            status, _, body = read_response(f)
            assert status == 200 and json.loads(body)["path"] == p


def test_pipelined_post_then_get_and_connection_close(alive):
    t1, t2 = f"/echo?t={tag()}", f"/echo?t={tag()}"
    req1 = (f"POST {t1} HTTP/1.1\r\nHost: b.local.service\r\nTransfer-Encoding: chunked\r\n\r\n"
            "5\r\nhello\r\n0\r\n\r\n").encode()
    req2 = f"GET {t2} HTTP/1.1\r\nHost: b.local.service\r\nConnection: close\r\n\r\n".encode()
    with socket.create_connection((POD, EGRESS), timeout=5) as s:
        s.sendall(req1 + req2)
        f = s.makefile("rb")
        status, _, body = read_response(f)
        assert status == 200 and json.loads(body)["path"] == t1 and json.loads(body)["body_length"] == 5
        status, headers, body = read_response(f)
        assert status == 200 and json.loads(body)["path"] == t2
        assert headers.get("connection") == "close"
        assert f.read() == b""  # and the sidecar closed the connection


def test_upstream_connection_reuse(alive, upstream):
    n = 40
    with socket.create_connection((POD, EGRESS), timeout=5) as s:
        f = s.makefile("rb")
        for _ in range(n // 2):
            s.sendall(f"GET /echo?t={tag()} HTTP/1.1\r\nHost: reuse.svc\r\n\r\n".encode())
            assert read_response(f)[0] == 200
    for _ in range(n // 2):  # a new downstream connection each time: the upstream pool is independent
        assert egress("reuse.svc", f"/echo?t={tag()}").status == 200
    s_ = stats()
    assert s_[cl(U_REUSE) + "upstream_rq_total"] == n
    assert s_[cl(U_REUSE) + "upstream_cx_total"] <= 2
    assert upstream.connections[upa(U_REUSE)] <= 2


# --- 13. load balancing -------------------------------------------------------------------------------------------


def _servers(host: str, n: int) -> dict[str, int]:
    seen: dict[str, int] = {}
    for _ in range(n):
        r = egress(host, f"/echo?t={tag()}")
        assert r.status == 200
        seen[r.json()["server"]] = seen.get(r.json()["server"], 0) + 1
    return seen


def test_round_robin(alive):
    assert _servers("lb-rr.pod", 20) == {f"{ip}:{UP_PORT}": 10 for ip in LB_IPS}


@pytest.mark.parametrize("host", ["lb-rand.pod", "lb-lr.pod"])
def test_random_and_least_request_reach_both(alive, host):
    # P(all 30 on one of 2 endpoints) = 2 * 2**-30
    assert set(_servers(host, 30)) == {f"{ip}:{UP_PORT}" for ip in LB_IPS}


def test_least_request_avoids_busy_endpoint(alive):
    import threading

    busy: list[Resp] = []
    th = threading.Thread(target=lambda: busy.append(egress("lb-lr.pod", f"/delay/1?t={tag()}")))
    th.start()
    try:
        deadline = time.monotonic() + 2
        busy_server = None
        while busy_server is None and time.monotonic() < deadline:
            rq = admin_get("/clusters").body.decode()
            m = re.search(r"^lb-lr\.pod::([\d.]+:\d+)::rq_active::1$", rq, re.M)
            busy_server = m.group(1) if m else None
            time.sleep(0.02)
        assert busy_server is not None, "the delayed request never became active"
        seen = _servers("lb-lr.pod", 10)
        assert busy_server not in seen, seen  # with 2 endpoints, P2C always compares both
    finally:
        th.join(5)
    assert busy and busy[0].status == 200


# --- 14. admin ----------------------------------------------------------------------------------------------------


def test_admin_endpoints(alive):
    key = tag()
    r = egress("hdr.svc", f"/flaky/{key}/1/503", headers={"x-envoy-retry-on": "5xx"})
    assert r.status == 200  # one retried 503 and one 200 on the hdr.svc cluster
    hdr = up(U_HDR)
    text = admin_get("/stats")
    assert text.status == 200
    assert re.search(rf"^{re.escape(cl(U_HDR))}upstream_rq_200: [1-9]\d*$", text.body.decode(), re.M)
    assert stats()[cl(U_HDR) + "retry.upstream_rq_503"] >= 1
    prom = admin_get("/stats/prometheus")
    assert prom.status == 200
    body = prom.body.decode()
    for metric, code in (("envoy_cluster_upstream_rq", 200), ("envoy_cluster_retry_upstream_rq", 503)):
        want = rf'^{metric}\{{envoy_response_code="{code}",envoy_cluster_name="{re.escape(hdr)}"\}} [1-9]\d*$'
        assert re.search(want, body, re.M), f"{want} not in:\n" + "\n".join(
            ln for ln in body.splitlines() if metric in ln)
    clusters = admin_get("/clusters")
    assert clusters.status == 200
    assert f"{up(U_B)}::{upa(U_B)}::health_flags::healthy" in clusters.body.decode()
    assert "lb-rr.pod::127.0.152.2:18000::weight::1" in clusters.body.decode()
    sock = alive.admin_socket
    assert sock is not None
    dump = admin_socket_request(sock, "/config_dump")
    assert dump.status == 200 and isinstance(dump.json(), dict)
    info = admin_get("/server_info")
    assert info.status == 200 and info.json()["state"] == "LIVE"
    assert admin_socket_request(sock, "/quitquitquit").status == 405
    assert admin_socket_request(sock, "/healthcheck/fail", method="POST").status == 200
    try:
        r = admin_get("/ready")
        assert r.status == 503
    finally:
        assert admin_socket_request(sock, "/healthcheck/ok", method="POST").status == 200
    assert admin_get("/ready").status == 200
    assert admin_get("/no-such-page").status == 404


def test_admin_quitquitquit(workdir):
    pod = "127.0.155.1"
    sc = SidecarProc(workdir / "quit", pod, ADMIN, config={"admin": {"port": ADMIN}, "access_log": False,
                                                           "ingress": {"port": INGRESS, "to": UP_PORT}},
                     admin_socket=True)
    sc.start()
    try:
        assert sc.admin_socket is not None
        assert admin_socket_request(sc.admin_socket, "/quitquitquit").status == 405
        assert sc.alive()
        assert admin_socket_request(sc.admin_socket, "/quitquitquit", method="POST").status == 200
        assert sc.proc is not None
        assert sc.proc.wait(5) == 0
    finally:
        sc.stop()


# --- 15. access log -------------------------------------------------------------------------------------------------


def test_access_log_default_format(alive, access_log):
    t = f"/echo?t={tag()}"
    rid = str(uuid.uuid4())
    # chunked, so that this test does not depend on how a content-length body is forwarded
    r = egress("b.local.service", t, method="POST", body=iter([b"hel", b"lo"]), encode_chunked=True,
               headers={"User-Agent": "alog-agent/1.0", "x-request-id": rid}, source=CLIENT_IP)
    assert r.status == 200
    line = wait_log(access_log, t)
    assert line["method"] == "POST"
    assert line["path"] == t
    assert line["protocol"] == "HTTP/1.1"
    assert line["code"] == "200"
    assert line["flags"] == "-"
    assert line["rx"] == "5"
    assert line["tx"] == str(len(r.body))
    assert line["ust"] == r.headers["x-envoy-upstream-service-time"]
    assert line["xff"] == CLIENT_IP
    assert line["ua"] == "alog-agent/1.0"
    assert line["rid"] == rid
    assert line["authority"] == "b.local.service"
    assert line["upstream"] == upa(U_B)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["start"]), line["start"]


def test_access_log_complete_after_sigterm(workdir, upstream):
    pod = "127.0.156.1"
    log = workdir / "term" / "access.log"
    sc = SidecarProc(workdir / "term", pod, ADMIN, config={
        "admin": {"port": ADMIN}, "access_log": str(log),
        "egress": {"port": EGRESS, "routes": [{"host": "b.local.service", "to": upa(U_B)}]}})
    sc.start()
    try:
        n = 200
        with socket.create_connection((pod, EGRESS), timeout=5) as s:
            f = s.makefile("rb")
            for i in range(n):
                s.sendall(f"GET /term/{i} HTTP/1.1\r\nHost: b.local.service\r\n\r\n".encode())
                assert read_response(f)[0] == 200
        assert sc.proc is not None
        sc.proc.send_signal(signal.SIGTERM)
        assert sc.proc.wait(10) == 0
        lines = [ln for ln in log_lines(log) if LOG_RE.match(ln)]
        assert len(lines) == n
        assert {LOG_RE.match(ln).group("path") for ln in lines} == {f"/term/{i}" for i in range(n)}  # type: ignore[union-attr]
    finally:
        sc.stop()


def test_sigterm_drains_in_flight_request(workdir, upstream):
    import threading

    pod = "127.0.157.1"
    log = workdir / "drain" / "access.log"
    sc = SidecarProc(workdir / "drain", pod, ADMIN, config={
        "admin": {"port": ADMIN}, "access_log": str(log),
        "egress": {"port": EGRESS, "routes": [{"host": "b.local.service", "to": upa(U_B)}]}})
    sc.start()
    try:
        t = f"/delay/0.6?t={tag()}"
        got: list[Resp] = []
        th = threading.Thread(target=lambda: got.append(request(pod, EGRESS, t, host="b.local.service")))
        th.start()
        wait_count(upstream, t, 1)
        assert sc.proc is not None
        sc.proc.send_signal(signal.SIGTERM)
        th.join(5)
        assert got and got[0].status == 200 and got[0].body == b"delayed\n"
        assert sc.proc.wait(10) == 0
        assert wait_log(log, t, timeout=0.5)["code"] == "200"
    finally:
        sc.stop()


# --- 16. the seed's envoy.yaml, unchanged ----------------------------------------------------------------------------


def test_seed_envoy_yaml(workdir):
    pod, remote = "127.0.160.1", "127.0.160.2"
    # The seed's envoy.yaml is kept unchanged, with its fixed ports (80 among them).
    require_ports("examples/seed/envoy.yaml binds the seed's fixed ports",
                  *((pod, p) for p in (80, 9001, 9901)), (pod, 8000), (remote, 80))
    with UpstreamServer([(pod, 8000), (remote, 80)]) as ups:
        sc = SidecarProc(workdir / "seed", pod, 9901, envoy=str(ROOT / "examples/seed/envoy.yaml"),
                         hosts=f"{remote}\tb.service\n")
        sc.start()
        try:
            # ingress :80 -> local_service (127.0.0.1:8000 is the pod alias)
            r = request(pod, 80, "/echo?t=in", host="anything")
            assert r.status == 200 and r.json()["server"] == f"{pod}:8000"
            # egress :9001 -> b.service:80 through the pod's hosts file
            r = request(pod, 9001, "/echo?t=out", host="b.local.service")
            assert r.status == 200 and r.json()["server"] == f"{remote}:80"
            assert request(pod, 9001, "/echo?t=out2", host="b.local.service:9001").status == 200
            assert request(pod, 9001, "/echo", host="c.local.service").status == 404
            # egress retries 5xx twice
            assert request(pod, 9001, "/flaky/seed/2/503", host="b.local.service").status == 200
            assert ups.keys["seed"] == 3
            assert request(pod, 9001, "/status/503?t=seed", host="b.local.service").status == 503
            assert ups.count("/status/503?t=seed") == 3
            s = stats(pod, 9901)
            assert s["cluster.remote_service_b.upstream_rq_retry"] == 4
            # the admin says 0.0.0.0 but is bound to the pod alias only
            assert sc.proc is not None
            listening = {(c.laddr.ip, c.laddr.port) for c in psutil.Process(sc.proc.pid).net_connections("tcp")
                         if c.status == psutil.CONN_LISTEN}
            assert (pod, 9901) in listening
            assert ("0.0.0.0", 9901) not in listening
            assert all(ip == pod for ip, _ in listening), listening
            with pytest.raises(OSError):
                socket.create_connection(("127.0.160.3", 9901), timeout=1).close()
        finally:
            sc.stop()


# --- client disconnects --------------------------------------------------------------------------------------------


def test_client_disconnect_cancels_the_upstream_attempt(alive, upstream, access_log):
    """A client that hangs up must not keep an upstream request (and a breaker slot) busy."""
    t = f"/delay/2?t={tag()}"
    with socket.create_connection((POD, EGRESS), timeout=5) as s:
        s.sendall(f"GET {t} HTTP/1.1\r\nHost: hdr.svc\r\n\r\n".encode())
        assert wait_count(upstream, t, 1) == 1
        assert stat(cl(U_HDR) + "upstream_rq_active") == 1
    start = time.monotonic()
    while stat(cl(U_HDR) + "upstream_rq_active") != 0 and time.monotonic() - start < 1.5:
        time.sleep(0.02)
    assert stat(cl(U_HDR) + "upstream_rq_active") == 0
    assert time.monotonic() - start < 1.5  # well before the upstream's 2 s answer
    line = wait_log(access_log, t)
    assert "DC" in flags(line), line


# --- hardening (found in review) ------------------------------------------------------------------------


def _read_response(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """One response head plus its Content-Length body."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    m = re.search(rb"content-length: (\d+)", head, re.I)
    need = int(m.group(1)) if m else 0
    while len(rest) < need:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return head + b"\r\n\r\n" + rest


def test_early_upstream_answer_never_lets_a_body_leak_into_the_next_request(alive, upstream):
    """An upstream that answers before reading a large body must not get the rest spliced into the pool."""
    t = f"/early?t={tag()}"
    with socket.create_connection((POD, EGRESS), timeout=5) as s1:
        s1.sendall(f"POST {t} HTTP/1.1\r\nHost: reuse.svc\r\nContent-Length: 3000000\r\n\r\n".encode()
                   + b"A" * 1_500_000)
        assert _read_response(s1).startswith(b"HTTP/1.1 200")
        for i in range(3):  # the next clients of the same cluster get clean exchanges
            probe = f"/status/200?victim={tag()}"
            with socket.create_connection((POD, EGRESS), timeout=5) as s2:
                s2.sendall(f"GET {probe} HTTP/1.1\r\nHost: reuse.svc\r\nX-Victim: {i}\r\n\r\n".encode())
                assert _read_response(s2).startswith(b"HTTP/1.1 200")
            assert wait_count(upstream, probe, 1) == 1


def test_thousands_of_pipelined_local_replies_in_order(alive):
    n = 3000
    one = b"GET /x HTTP/1.1\r\nHost: nobody.svc\r\n\r\n"
    data = one * n + b"GET /x HTTP/1.1\r\nHost: nobody.svc\r\nConnection: close\r\n\r\n"
    out = raw_exchange(POD, EGRESS, data, timeout=10)
    assert out.count(b"HTTP/1.1 404 Not Found") == n + 1


def test_trailers_do_not_change_routing(alive, upstream):
    t = f"/echo?t={tag()}"
    body = (f"POST {t} HTTP/1.1\r\nHost: hdr.svc\r\nTransfer-Encoding: chunked\r\n\r\n"
            "3\r\nabc\r\n0\r\nHost: b.local.service\r\nx-envoy-upstream-rq-timeout-ms: 0\r\n\r\n").encode()
    with socket.create_connection((POD, EGRESS), timeout=5) as s:
        s.sendall(body)
        assert _read_response(s).startswith(b"HTTP/1.1 200")
    rec = upstream.requests_for(t)
    assert len(rec) == 1 and rec[0].listener == upa(U_HDR)
    assert rec[0].header_all("host") == ["hdr.svc"]


@pytest.mark.parametrize("request_bytes, status", [
    (b"GET / HTTP/1.1\r\nHost: hdr.svc\r\nHost: b.local.service\r\n\r\n", b"400"),
    (b"CONNECT hdr.svc:443 HTTP/1.1\r\nHost: hdr.svc:443\r\n\r\n", b"405"),
])
def test_ambiguous_or_tunnel_requests_are_refused(alive, request_bytes, status):
    out = raw_exchange(POD, EGRESS, request_bytes)
    assert out.startswith(b"HTTP/1.1 " + status) and out.count(b"HTTP/1.1 ") == 1, out


def test_upgrade_request_is_served_as_plain_http(alive, upstream):
    t = f"/status/200?t={tag()}"
    with socket.create_connection((POD, EGRESS), timeout=5) as s:
        s.sendall(f"GET {t} HTTP/1.1\r\nHost: hdr.svc\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n".encode())
        assert _read_response(s).startswith(b"HTTP/1.1 200")
        s.sendall(f"GET {t}&again HTTP/1.1\r\nHost: hdr.svc\r\n\r\n".encode())  # and the connection lives on
        assert _read_response(s).startswith(b"HTTP/1.1 200")
    assert upstream.requests_for(t)[0].header("upgrade") is None


def test_http10_keep_alive_is_announced(alive):
    with socket.create_connection((POD, EGRESS), timeout=5) as s:
        s.sendall(b"GET /status/200 HTTP/1.0\r\nHost: hdr.svc\r\nConnection: keep-alive\r\n\r\n")
        head = _read_response(s).split(b"\r\n\r\n")[0].lower()
    assert b"connection: keep-alive" in head


def test_client_leaving_mid_upload_is_logged(alive, access_log):
    t = f"/echo?t={tag()}"
    with socket.create_connection((POD, EGRESS), timeout=5) as s:
        s.sendall(f"POST {t} HTTP/1.1\r\nHost: hdr.svc\r\nContent-Length: 1000\r\n\r\n0123456789".encode())
        time.sleep(0.2)
    line = wait_log(access_log, t)
    assert "DC" in flags(line), line
