"""``meshctl traffic``: grouping, percentiles, coordinated omission, error kinds, targets, pods.

Real sockets and real processes: the test servers are raw asyncio servers in a
thread (so one of them can stall its whole event loop), the CLI runs in a
subprocess, the pods are a real mesh. Addresses: 127.0.170.1-127.0.179.1 only.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import pty
import random
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from meshctl.traffic.histogram import LatencyHistogram
from meshctl.traffic.report import BODY_WIDTH, classify, mask_body
from tests.conftest import ROOT, free_port, wait_for

HTTP_SERVER = "[python, -m, http.server, --bind, '${POD_IP}', '8000']"


# --------------------------------------------------------------------------------------------------
# A tiny HTTP/1.1 server in a thread


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    conn: int = 0  # which connection it came on


def response(status: int, body: bytes, extra: str = "") -> bytes:
    reason = {200: "OK", 503: "Service Unavailable"}.get(status, "X")
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Length: {len(body)}\r\nContent-Type: text/plain\r\n"
            f"{extra}\r\n").encode() + body


Handler = Callable[["Server", Request, asyncio.Transport], None]


class _Conn(asyncio.Protocol):
    def __init__(self, server: Server) -> None:
        self.server = server
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport):
        self.transport = transport
        self.server.transports.add(transport)
        self.server.accepted += 1
        self.number = self.server.accepted

    def connection_lost(self, exc):
        self.server.transports.discard(self.transport)

    def data_received(self, data):
        self.buf += data
        while True:
            head, sep, rest = self.buf.partition(b"\r\n\r\n")
            if not sep:
                return
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            headers = {}
            for line in lines[1:]:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
            length = int(headers.get("content-length", "0"))
            if len(rest) < length:
                return
            self.buf = rest[length:]
            req = Request(method, path, headers, rest[:length], self.number)
            self.server.requests.append(req)
            if self.transport.is_closing():
                return
            self.server.handler(self.server, req, self.transport)


@dataclass
class Server:
    ip: str
    handler: Handler
    port: int = 0
    requests: list[Request] = field(default_factory=list)
    transports: set = field(default_factory=set)
    accepted: int = 0  # connections so far

    def __enter__(self) -> Server:
        ready = threading.Event()
        self.loop = asyncio.new_event_loop()

        def serve() -> None:
            asyncio.set_event_loop(self.loop)
            srv = self.loop.run_until_complete(self.loop.create_server(lambda: _Conn(self), self.ip, 0, backlog=512))
            self.srv = srv
            self.port = srv.sockets[0].getsockname()[1]
            ready.set()
            self.loop.run_forever()
            srv.close()
            for t in list(self.transports):
                t.abort()
            self.loop.run_until_complete(asyncio.sleep(0.01))
            self.loop.close()

        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()
        assert ready.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    @property
    def url(self) -> str:
        return f"http://{self.ip}:{self.port}/"


def ok(server, req, transport):
    transport.write(response(200, b"hello"))


def stall_once(at: int, seconds: float = 1.0) -> Handler:
    """Answers at once, but blocks the whole event loop for ``seconds`` on request number ``at``."""
    def handler(server, req, transport):
        if len(server.requests) == at:
            time.sleep(seconds)
        transport.write(response(200, b"fast"))
    return handler


def echo(server, req, transport):
    """The method and the body length, so a request's body is visible in the groups."""
    if req.method == "HEAD":
        transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 123\r\nContent-Type: text/plain\r\n\r\n")
        return
    transport.write(response(200, f"{req.method} {len(req.body)}".encode()))


def reset(server, req, transport):
    transport.close()


def hang(server, req, transport):
    pass


def unavailable(server, req, transport):
    transport.write(response(503, b"no backend 7f3a9c2e11d4"))


def traffic(meshctl, *args, check=True, timeout=60):
    return meshctl("traffic", *args, check=check, timeout=timeout)


def traffic_json(meshctl, *args, timeout=60):
    return json.loads(traffic(meshctl, *args, "--json", timeout=timeout).stdout)


# --------------------------------------------------------------------------------------------------
# Grouping


def test_mask_body_groups_the_seeds_bodies():
    a = mask_body("Service A: upstream responded with: Service B: Yay! nounce 1008262846")
    b = mask_body("Service A: upstream responded with: Service B: Yay! nounce 3494557023")
    assert a == b == "Service A: upstream responded with: Service B: Yay! nounce <n>"
    assert classify(200, b"Service B: Yay! nounce 1008262846\n") == ("200", "Service B: Yay! nounce <n>")


def test_mask_body_ids_and_short_numbers():
    assert mask_body("req 123e4567-e89b-12d3-a456-426614174000 done") == "req <n> done"
    assert mask_body("req 123E4567-E89B-12D3-A456-426614174000") == "req <n>"
    assert mask_body("trace 7f3a9c2e11d4 span 0xdeadbeef") == "trace <n> span <n>"
    assert mask_body("Service A: upstream failed with: HTTP 500 - Service B: Ooops... nounce 42424242") == \
        "Service A: upstream failed with: HTTP 500 - Service B: Ooops... nounce <n>"
    # Short numbers and plain words stay: status codes, versions, ordinary hex-looking words.
    assert mask_body("HTTP 500 after 3 tries, v1.2") == "HTTP 500 after 3 tries, v1.2"
    assert mask_body("decade facade") == "decade facade"


def test_mask_body_folds_lines_and_truncates():
    assert mask_body("line one\n  line two\r\n\tthree\n\n") == "line one line two three"
    assert mask_body("") == ""
    long = mask_body("word " * 100)
    assert len(long) == BODY_WIDTH and long.endswith("…")
    assert mask_body("x" * BODY_WIDTH) == "x" * BODY_WIDTH
    assert classify(502, b"bad \xff\xfe bytes") == ("502", "bad \ufffd\ufffd bytes")


# --------------------------------------------------------------------------------------------------
# Percentiles


def test_histogram_quantiles_within_one_percent():
    rng = random.Random(1)
    samples = [rng.lognormvariate(math.log(0.002), 1.0) for _ in range(100_000)]
    h = LatencyHistogram()
    for s in samples:
        h.record(s)
    ordered = sorted(samples)
    for q in (0.5, 0.9, 0.99, 0.999):
        exact = ordered[math.ceil(q * len(ordered)) - 1]
        est = h.quantile(q)
        assert abs(est - exact) / exact <= 0.01, (q, est, exact)
    assert h.count == len(samples)
    assert h.min == ordered[0] and h.max == ordered[-1]
    assert h.mean == pytest.approx(sum(samples) / len(samples), rel=1e-9)
    assert h.quantile(0) >= h.min and h.quantile(1) == pytest.approx(h.max, rel=0.01)
    assert sum(c for _, _, c in h.bars(10)) == h.count
    assert LatencyHistogram().quantile(0.5) is None


# --------------------------------------------------------------------------------------------------
# Coordinated omission


def test_open_model_shows_a_stall_the_closed_model_hides(meshctl):
    with Server("127.0.170.1", stall_once(100)) as srv:
        closed = traffic_json(meshctl, srv.url, "-c", "1", "--n", "300")
    assert closed["requests"] == 300 and closed["status"] == {"200": 300}
    assert closed["latency_ms"]["max"] >= 900  # the one stalled request
    assert closed["latency_ms"]["p99"] < 500, closed["latency_ms"]

    with Server("127.0.170.1", stall_once(100)) as srv:
        t0 = time.monotonic()
        opened = traffic_json(meshctl, srv.url, "--rate", "200", "--duration", "2s", "-c", "20")
        elapsed = time.monotonic() - t0
    assert opened["model"].startswith("open model")
    assert 350 <= opened["requests"] <= 410, opened
    assert opened["status"] == {"200": opened["requests"]} and not opened["errors"]
    # ~200 requests were scheduled during the stall; their latency counts from the schedule.
    assert opened["latency_ms"]["p99"] >= 800, opened["latency_ms"]
    assert opened["latency_ms"]["p90"] >= 100, opened["latency_ms"]
    assert elapsed < 10


# --------------------------------------------------------------------------------------------------
# Errors versus statuses


def test_refused_is_an_error_not_a_status(meshctl):
    r = traffic_json(meshctl, "http://127.0.171.1:9/", "--n", "20", "-c", "2")
    assert r["requests"] == 20
    assert r["errors"] == {"refused": 20} and r["status"] == {}
    assert r["success_ratio"] == 0
    assert r["groups"] == [{"count": 20, "status": "error", "body": "refused"}]


def test_reset_is_an_error(meshctl):
    with Server("127.0.171.1", reset) as srv:
        r = traffic_json(meshctl, srv.url, "--n", "20", "-c", "4")
    assert r["requests"] == 20
    assert r["errors"] == {"reset": 20} and r["status"] == {}
    assert r["groups"] == [{"count": 20, "status": "error", "body": "reset"}]
    assert len(srv.requests) == 20


def test_timeout_is_an_error(meshctl):
    with Server("127.0.171.1", hang) as srv:
        t0 = time.monotonic()
        r = traffic_json(meshctl, srv.url, "--n", "6", "-c", "3", "--timeout", "0.3", timeout=20)
        elapsed = time.monotonic() - t0
    assert r["requests"] == 6
    assert r["errors"] == {"timeout": 6} and r["status"] == {}
    assert r["groups"] == [{"count": 6, "status": "error", "body": "timeout"}]
    assert elapsed < 5


def test_5xx_is_a_status_not_an_error(meshctl):
    with Server("127.0.171.1", unavailable) as srv:
        r = traffic_json(meshctl, srv.url, "--n", "30", "-c", "3")
    assert r["status"] == {"503": 30} and r["errors"] == {}
    assert r["success_ratio"] == 0
    assert r["groups"] == [{"count": 30, "status": "503", "body": "no backend <n>"}]


def test_fail_under(meshctl):
    with Server("127.0.172.1", unavailable) as bad, Server("127.0.172.1", ok) as good:
        low = traffic(meshctl, bad.url, "--n", "10", "--json", "--fail-under", "0.5", check=False)
        assert low.returncode == 1, low
        assert "below --fail-under" in low.stderr
        assert json.loads(low.stdout)["success_ratio"] == 0  # the report is still printed
        high = traffic(meshctl, good.url, "--n", "10", "--json", "--fail-under", "0.5", check=False)
        assert high.returncode == 0, high
        assert high.stderr == ""
        usage = traffic(meshctl, good.url, "--n", "10", "--fail-under", "2", check=False)
        assert usage.returncode == 2
        assert "--fail-under" in usage.stderr
        assert len(good.requests) == 10  # the usage error sent nothing


# --------------------------------------------------------------------------------------------------
# Report formats


def test_json_shape_and_text_report(meshctl):
    with Server("127.0.173.1", ok) as srv:
        r = traffic_json(meshctl, srv.url, "--n", "50", "-c", "5")
        text = traffic(meshctl, srv.url, "--n", "50", "-c", "5").stdout
    assert set(r) == {"target", "model", "requests", "duration_s", "rps", "success_ratio", "status", "errors",
                      "latency_ms", "groups"}
    assert set(r["latency_ms"]) == {"min", "mean", "p50", "p90", "p95", "p99", "p999", "max"}
    assert r["target"] == srv.url and r["model"] == "closed model, 5 connections"
    assert r["requests"] == 50 and r["status"] == {"200": 50} and r["errors"] == {}
    assert r["success_ratio"] == 1 and r["duration_s"] > 0 and r["rps"] > 0
    lat = r["latency_ms"]
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p95"] <= lat["p99"] <= lat["p999"] <= lat["max"]
    assert lat["min"] <= lat["mean"] <= lat["max"]
    assert r["groups"] == [{"count": 50, "status": "200", "body": "hello"}]
    for g in r["groups"]:
        assert set(g) == {"count", "status", "body"}

    assert "\x1b" not in text and "\r" not in text  # not a TTY: no progress bar
    heads = ["count", "Status codes:", "Errors:", "Success ratio:", "Latency (ms):", "Histogram (ms):"]
    positions = [text.index(h) for h in heads]
    assert positions == sorted(positions), text
    assert "200     hello" in text and "200: 50 (100.0%)" in text and "none" in text
    assert "Success ratio: 100.00%" in text


# --------------------------------------------------------------------------------------------------
# Targets and request options


def test_refuses_remote_targets(meshctl):
    r = traffic(meshctl, "http://10.1.2.3/", "--n", "1", check=False, timeout=20)
    assert r.returncode == 2
    assert "only 127.0.0.0/8" in r.stderr


def test_duration_and_n_bounds(meshctl):
    with Server("127.0.174.1", ok) as srv:
        t0 = time.monotonic()
        by_time = traffic_json(meshctl, srv.url, "--duration", "0.5s", "-c", "2")
        elapsed = time.monotonic() - t0
        assert elapsed < 3, elapsed
        assert by_time["requests"] > 50 and by_time["status"] == {"200": by_time["requests"]}
        assert 0.4 <= by_time["duration_s"] < 1.5

        t0 = time.monotonic()
        by_count = traffic_json(meshctl, srv.url, "--n", "50", "--duration", "30s", "-c", "4")
        assert time.monotonic() - t0 < 10
        assert by_count["requests"] == 50 and by_count["status"] == {"200": 50}


def test_post_body_headers_and_head(meshctl, tmp_path):
    payload = tmp_path / "payload.bin"
    payload.write_bytes(b"z" * 777)
    with Server("127.0.175.1", echo) as srv:
        r = traffic_json(meshctl, srv.url, "-m", "POST", "-d", f"@{payload}", "-H", "X-Test: yes",
                         "--path", "/submit", "--n", "10", "-c", "2")
        assert r["groups"] == [{"count": 10, "status": "200", "body": "POST 777"}]
        posts = [q for q in srv.requests if q.method == "POST"]
        assert len(posts) == 10
        for q in posts:
            assert q.path == "/submit" and q.body == b"z" * 777
            assert q.headers["x-test"] == "yes" and q.headers["content-length"] == "777"
            assert q.headers["host"] == f"127.0.175.1:{srv.port}"

        inline = traffic_json(meshctl, srv.url, "-m", "PUT", "-d", "abc", "--n", "3", "-c", "1")
        assert inline["groups"] == [{"count": 3, "status": "200", "body": "PUT 3"}]

        # HEAD with a Content-Length: no body follows, the connection must be reused, not hang.
        t0 = time.monotonic()
        head = traffic_json(meshctl, srv.url, "-m", "HEAD", "--n", "20", "-c", "1", "--timeout", "2", timeout=30)
        assert time.monotonic() - t0 < 5
        assert head["status"] == {"200": 20} and head["errors"] == {}
        assert len([q for q in srv.requests if q.method == "HEAD"]) == 20
    # Keep-alive: 10 POSTs on 2 connections, 3 PUTs on 1 (the HEADs: see the known bug below).
    assert len({q.conn for q in srv.requests if q.method == "POST"}) == 2
    assert len({q.conn for q in srv.requests if q.method == "PUT"}) == 1


# --------------------------------------------------------------------------------------------------
# Pods and replicas


def _log_hits(meshctl, project: str, replica: str, path: str) -> int:
    out = meshctl("logs", replica, "-p", project).stdout  # a failing `logs` is an error, not 0 hits
    return sum(1 for line in out.splitlines() if f'"GET {path} HTTP/1.1"' in line)


def test_pods_and_replicas(meshctl):
    port = free_port("127.0.179.1")
    topo = meshctl.write("t.yaml", f"""
        pods:
          web:
            ip: 127.0.176.1
            publish: ["127.0.179.1:{port}:8000"]
            service:
              command: {HTTP_SERVER}
              ready: {{tcp: 8000}}
          rep:
            ip: 127.0.177.1
            replicas: 2
            service:
              command: {HTTP_SERVER}
              ready: {{tcp: 8000}}
    """)
    meshctl.up(topo, "trf")
    ips = {p["replica"]: p["ip"] for p in meshctl.ps("trf")["processes"]}
    assert ips["rep-0"] == "127.0.177.1" and ips["rep-1"] == "127.0.178.1"

    web = traffic_json(meshctl, "web", "--n", "20", "-p", "trf", "--path", "/pub")
    assert web["target"] == f"http://127.0.179.1:{port}/pub"
    assert web["requests"] == 20 and web["errors"] == {} and web["status"] == {"404": 20}
    assert wait_for(lambda: _log_hits(meshctl, "trf", "web-0", "/pub") == 20, 5)

    spread = traffic_json(meshctl, "rep", "--n", "20", "-p", "trf", "--path", "/spread", "-c", "4")
    assert spread["requests"] == 20 and spread["errors"] == {}
    assert "(+1 replicas)" in spread["target"]
    assert wait_for(lambda: _log_hits(meshctl, "trf", "rep-0", "/spread")
                    + _log_hits(meshctl, "trf", "rep-1", "/spread") == 20, 5)
    assert _log_hits(meshctl, "trf", "rep-0", "/spread") >= 5
    assert _log_hits(meshctl, "trf", "rep-1", "/spread") >= 5

    one = traffic_json(meshctl, "rep-1", "--n", "10", "-p", "trf", "--path", "/only1")
    assert one["target"] == "http://127.0.178.1:8000/only1"
    assert one["requests"] == 10 and one["errors"] == {}
    assert wait_for(lambda: _log_hits(meshctl, "trf", "rep-1", "/only1") == 10, 5)
    assert _log_hits(meshctl, "trf", "rep-0", "/only1") == 0

    missing = traffic(meshctl, "nope", "--n", "1", "-p", "trf", check=False)
    assert missing.returncode == 2 and "no pod or replica named 'nope'" in missing.stderr


# --------------------------------------------------------------------------------------------------
# Known bugs (these fail until meshctl/loadgen.py and meshctl/traffic.py are fixed; see each docstring)


def test_head_reuses_keep_alive_connections(meshctl):
    """loadgen.py _Client.on_headers_complete swaps in a fresh parser for HEAD before
    on_message_complete asks ``self.parser.should_keep_alive()`` -- the fresh parser says False,
    so every HEAD request closes its connection and opens a new one."""
    with Server("127.0.175.1", echo) as srv:
        head = traffic_json(meshctl, srv.url, "-m", "HEAD", "--n", "20", "-c", "1", "--timeout", "2", timeout=30)
    assert head["status"] == {"200": 20}
    assert len({q.conn for q in srv.requests}) == 1, "one keep-alive connection should carry all 20 HEADs"


def eof_delimited(server, req, transport):
    transport.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil eof")
    transport.close()


def test_close_delimited_body_is_a_response_not_a_reset(meshctl):
    """A response without Content-Length or chunking ends when the server closes (RFC 9112 6.3);
    loadgen.py _Client.connection_lost counts it as a "reset" error because httptools never
    completes such a message (it has no feed_eof)."""
    with Server("127.0.175.1", eof_delimited) as srv:
        r = traffic_json(meshctl, srv.url, "--n", "5", "-c", "1")
    assert r["errors"] == {} and r["status"] == {"200": 5}, r
    assert r["groups"] == [{"count": 5, "status": "200", "body": "until eof"}]


def test_progress_bar_goes_to_stderr(meshctl):
    """traffic.py _progress builds ``Progress(..., console=None)``: rich's default console is stdout,
    while the bar is enabled by ``stderr_is_tty()`` -- with stderr on a terminal and stdout piped
    (``meshctl traffic a > report.txt``) no bar shows and stdout gets a stray blank line."""
    with Server("127.0.175.1", ok) as srv:
        master, slave = pty.openpty()
        try:
            proc = subprocess.Popen([sys.executable, "-m", "meshctl", "traffic", srv.url, "--rate", "50",
                                     "--duration", "1s"], stdout=subprocess.PIPE, stderr=slave, cwd=ROOT,
                                    env={**meshctl.env, "TERM": "xterm", "COLUMNS": "100"})
            os.close(slave)
            slave = -1
            out, _ = proc.communicate(timeout=20)
            err = b""
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline and select.select([master], [], [], 0.2)[0]:
                try:
                    chunk = os.read(master, 65536)
                except OSError:
                    break
                if not chunk:
                    break
                err += chunk
        finally:
            os.close(master)
            if slave >= 0:
                os.close(slave)
    assert proc.returncode == 0
    assert out.decode().startswith("50 requests to "), out[:200]
    assert b"traffic" in err, err[:200]


def test_workers_share_the_load_and_merge_exactly(meshctl):
    """Several processes (as hey uses several cores): counts, groups and the histogram add up."""
    with Server("127.0.178.1", ok) as srv:
        r = traffic_json(meshctl, srv.url, "--n", "3000", "-c", "6", "--workers", "3")
        assert len(srv.requests) == 3000
        assert srv.accepted == 6
    assert r["requests"] == 3000 and r["status"] == {"200": 3000}
    assert r["model"] == "closed model, 6 connections, 3 workers"
    assert sum(g["count"] for g in r["groups"]) == 3000
    lat = r["latency_ms"]
    assert 0 < lat["min"] <= lat["p50"] <= lat["p99"] <= lat["max"]
    assert meshctl("traffic", srv.url, "--workers", "0", check=False).returncode == 2


def test_killed_traffic_leaves_no_workers_sending_load(meshctl):
    """kill -9 of `meshctl traffic` ends its worker processes too: no load keeps hitting the target."""
    import psutil

    with Server("127.0.178.1", ok) as srv:
        p = subprocess.Popen([sys.executable, "-m", "meshctl", "traffic", srv.url, "--duration", "20s", "-c", "4",
                              "--workers", "2", "--json"], env=meshctl.env, cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while len(srv.requests) < 100 and time.monotonic() < deadline:
                time.sleep(0.05)
            workers = psutil.Process(p.pid).children(recursive=True)
            assert len(workers) == 2
        finally:
            p.kill()
            p.wait(10)
        gone, alive = psutil.wait_procs(workers, timeout=3)
        assert not alive, alive
        # Every connection the workers had is closed (no process survives holding one) ...
        assert wait_for(lambda: not srv.transports, 10), srv.transports
        seen, accepted = len(srv.requests), srv.accepted
        # ... and nothing connects again: "no load afterwards" needs a stretch of time to watch; 0.3 s is
        # several hundred requests' worth at the rate the workers were sending (no timing is asserted).
        time.sleep(0.3)
        assert (len(srv.requests), srv.accepted) == (seen, accepted)  # the load stopped with the command


def test_auto_workers_leave_a_local_target_half_the_cores():
    """A local target shares our cores: the default takes half of them (wrk -t1 beside nginx's one worker)."""
    from meshctl.traffic.engine import LoadSpec
    from meshctl.traffic.workers import auto_workers

    local = LoadSpec(targets=(("127.0.0.1", 80),), request=b"", n=50_000, concurrency=10)
    assert auto_workers(local, cores=2) == 1
    assert auto_workers(local, cores=8) == 4
    assert auto_workers(local, cores=1) == 1
    remote = LoadSpec(targets=(("10.1.2.3", 80),), request=b"", n=50_000, concurrency=10)
    assert auto_workers(remote, cores=2) == 2
    assert auto_workers(LoadSpec(targets=(("127.0.0.1", 80),), request=b"", n=500, concurrency=10), cores=8) == 1
    assert auto_workers(LoadSpec(targets=(("127.0.0.1", 80),), request=b"", duration_s=5, concurrency=3),
                        cores=16) == 3
