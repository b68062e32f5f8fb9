"""Request heads Envoy refuses, and configurations that cannot work, against a real sidecar process.

Statuses, bodies and response flags are the ones Envoy 1.40 gives (HCM with accept_http_10, as this sidecar
behaves). Addresses: 127.0.190.x only; ports are picked free.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest

from sidecar.config import ConfigError
from sidecar.envoy_config import compile_envoy
from sidecar.short_config import compile_short
from tests.conftest import free_port
from tests.test_sidecar_proxy import ROOT, SidecarProc, flags, raw_exchange, wait_log
from tests.upstreams import UpstreamServer, serve_upstream

POD = "127.0.190.1"
UPSTREAM = "127.0.190.2"


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[UpstreamServer, int]]:
    yield from serve_upstream(UPSTREAM)


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, upstream: tuple[UpstreamServer, int]) -> Iterator[SidecarProc]:
    workdir = tmp_path_factory.mktemp("sidecar_edge")
    admin, ingress = free_port(POD), free_port(POD)
    config = {"admin": {"port": admin}, "access_log": str(workdir / "access.log"),
              "ingress": {"port": ingress, "to": f"{UPSTREAM}:{upstream[1]}"}}
    sc = SidecarProc(workdir, POD, admin, config=config)
    sc.ingress = ingress  # type: ignore[attr-defined]
    sc.access_log = workdir / "access.log"  # type: ignore[attr-defined]
    sc.start()
    yield sc
    sc.stop()


def send(proxy: SidecarProc, head: bytes) -> tuple[int, bytes]:
    """Status and body of the answer to raw request bytes."""
    raw = raw_exchange(POD, proxy.ingress, head, timeout=5)  # type: ignore[attr-defined]
    assert raw.startswith(b"HTTP/1.1 "), raw
    head_part, _, body = raw.partition(b"\r\n\r\n")
    return int(head_part.split()[1]), body


def target() -> str:
    return f"/echo?t={uuid.uuid4().hex[:12]}"


def echoed(body: bytes) -> dict[str, str]:
    """The headers the upstream received (last value per lower-case name)."""
    return {n.lower(): v for n, v in json.loads(body)["headers"]}


@pytest.mark.parametrize("version", ["1.1", "1.0"])
def test_request_without_host_is_400(proxy, upstream, version):
    t = target()
    status, body = send(proxy, f"GET {t} HTTP/{version}\r\n\r\n".encode())
    # Envoy: 400, empty body, no response flag (details: missing_host_header), for 1.0 too with accept_http_10
    assert (status, body) == (400, b"")
    assert upstream[0].count(t) == 0
    line = wait_log(proxy.access_log, t)  # type: ignore[attr-defined]
    assert line["code"] == "400" and flags(line) == set()


def test_http09_request_is_400(proxy, upstream):
    t = target()
    status, body = send(proxy, f"GET {t}\r\n\r\n".encode())
    assert (status, body) == (400, b"")
    assert upstream[0].count(t) == 0


@pytest.mark.parametrize("host", ["a b", "a/b", "a{b"])
def test_invalid_host_is_400(proxy, upstream, host):
    t = target()
    status, body = send(proxy, f"GET {t} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    assert (status, body) == (400, b"Bad Request")  # Envoy: DPE, http.invalid_authority
    assert upstream[0].count(t) == 0
    assert "DPE" in flags(wait_log(proxy.access_log, t))  # type: ignore[attr-defined]


def test_valid_authorities_are_forwarded(proxy, upstream):
    for host in ("b.svc:80", "[::1]:80", "a_b.c~!$&'()*+,;=%@x", ""):
        t = target()
        status, body = send(proxy, f"GET {t} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        assert status == 200, (host, body)
        assert echoed(body)["host"] == host


def test_connection_nominating_end_to_end_headers(proxy, upstream):
    # Envoy removes an ordinary nominated header; we also keep x-request-id (it joins the trace) and always
    # send the client's address in x-forwarded-for.
    t = target()
    raw = raw_exchange(POD, proxy.ingress, (  # type: ignore[attr-defined]
        f"GET {t} HTTP/1.1\r\nHost: h.svc\r\nConnection: x-request-id, x-foo, close\r\nx-request-id: rid-1\r\n"
        "x-forwarded-for: 10.0.0.1\r\nx-foo: 1\r\nx-bar: 2\r\n\r\n").encode(), timeout=5)
    assert raw.startswith(b"HTTP/1.1 200 "), raw
    got = echoed(raw.partition(b"\r\n\r\n")[2])
    assert got["host"] == "h.svc"
    assert got["x-request-id"] == "rid-1"
    assert got["x-forwarded-for"].startswith("10.0.0.1,127.")  # the client's address appended (Envoy: bare comma)
    assert "x-foo" not in got and got["x-bar"] == "2"


@pytest.mark.parametrize("nominated, body", [
    ("host, x-forwarded-for, x-request-id", b"Bad Request"),  # Envoy: DPE, http1.connection_header_rejected
    ("x-forwarded-proto", b"Bad Request"),
    ("a, b, c, d, e, f, g, h, i, j", b"Bad Request"),  # ten tokens
    ("host", b""),  # Envoy drops Host and then answers its empty missing-Host 400; we never drop Host
])
def test_connection_nominations_envoy_refuses(proxy, upstream, nominated, body):
    t = target()
    status, got = send(proxy, f"GET {t} HTTP/1.1\r\nHost: h\r\nConnection: {nominated}\r\n"
                              "x-forwarded-for: 10.0.0.1\r\n\r\n".encode())
    assert (status, got) == (400, body)
    assert upstream[0].count(t) == 0


def _head(t: str, n_headers: int) -> bytes:
    """A request with ``n_headers`` header lines in all (Host included)."""
    extra = "".join(f"x-h{i}: v\r\n" for i in range(n_headers - 2))
    return f"GET {t} HTTP/1.1\r\nHost: h\r\n{extra}Connection: close\r\n\r\n".encode()


def test_header_count_limit_is_envoys_100(proxy, upstream):
    ok = target()
    assert send(proxy, _head(ok, 100))[0] == 200
    for n in (101, 500):
        t = target()
        assert send(proxy, _head(t, n)) == (431, b"Request Header Fields Too Large")  # http1.too_many_headers
        assert upstream[0].count(t) == 0
        line = wait_log(proxy.access_log, t)  # type: ignore[attr-defined]
        assert line["method"] == "GET" and "DPE" in flags(line)


# --- configurations that route a sidecar into itself ---------------------------------------------------------------


def test_short_form_ingress_to_its_own_port_is_an_error():
    with pytest.raises(ConfigError, match=r"^sidecar\.ingress\.to: 80 is this sidecar's own ingress listener"):
        compile_short({"ingress": {"port": 80, "to": 80}}, "127.0.0.2")
    with pytest.raises(ConfigError, match=r"^sidecar\.egress\.routes\[1\]\.to: .*own egress listener"):
        compile_short({"egress": {"port": 9001, "routes": [{"host": "b", "to": "b:80"},
                                                           {"host": "c", "to": "localhost:9001"}]}}, "127.0.0.2")
    compile_short({"ingress": {"port": 80, "to": 8080}}, "127.0.0.2")  # another port is fine


def _envoy_doc(listen_port: int, cluster_port: int, timeout: str = "15s") -> dict:
    hcm = {"@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
                    "HttpConnectionManager",
           "stat_prefix": "ingress_http",
           "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
               {"match": {"prefix": "/"}, "route": {"cluster": "svc", "timeout": timeout}}]}]},
           "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
               "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}
    return {"static_resources": {
        "listeners": [{"name": "in", "address": {"socket_address": {"address": "0.0.0.0", "port_value": listen_port}},
                       "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                       "typed_config": hcm}]}]}],
        "clusters": [{"name": "svc", "type": "STATIC", "connect_timeout": "1s", "load_assignment": {
            "cluster_name": "svc", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                "address": "127.0.0.1", "port_value": cluster_port}}}}]}]}}]}}


def test_envoy_cluster_pointing_at_its_own_listener_is_an_error():
    with pytest.raises(ConfigError, match=r"clusters\[0\]\.load_assignment: endpoint .* of cluster 'svc' is this "
                                          r"sidecar's own listener 'in'"):
        compile_envoy(_envoy_doc(80, 80), "127.0.0.2")
    compile_envoy(_envoy_doc(80, 8080), "127.0.0.2")


@pytest.mark.parametrize("form", ["short", "envoy"])
def test_sidecar_refuses_to_start_routed_into_itself(tmp_path, form):
    port = free_port(POD)
    if form == "short":
        path = tmp_path / "sidecar.json"
        path.write_text(json.dumps({"admin": {"port": free_port(POD)}, "ingress": {"port": port, "to": port}}))
        args = ["--config", str(path)]
    else:
        path = tmp_path / "envoy.json"
        path.write_text(json.dumps(_envoy_doc(port, port)))
        args = ["--envoy", str(path)]
    r = subprocess.run([sys.executable, "-m", "sidecar", "--pod-ip", POD, *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 2, r.stderr
    assert "own" in r.stderr and "loop back into the sidecar" in r.stderr


# --- durations: one syntax, the topology's --------------------------------------------------------------------------


def test_duration_with_minutes_in_both_front_ends(tmp_path):
    short = compile_short({"ingress": {"port": 80, "to": 8080, "timeout": "1m30s",
                                       "retry_policy": {"retry_on": "5xx", "per_try_timeout": "1m0.5s"}}},
                          "127.0.0.2")
    route = short.listeners[0].hcm.route_config.virtual_hosts[0].routes[0]
    assert route.timeout_s == 90.0
    assert route.retry_policy is not None and route.retry_policy.per_try_timeout_s == 60.5
    envoy = compile_envoy(_envoy_doc(80, 8080, timeout="1m30s"), "127.0.0.2")
    assert envoy.listeners[0].hcm.route_config.virtual_hosts[0].routes[0].timeout_s == 90.0
    # (Envoy 1.40 itself refuses "1m30s": "duration must end with a single 's'"; say so, keep running)
    assert any("'1m30s' accepted here" in w and "'90s'" in w for w in envoy.warnings), envoy.warnings
    with pytest.raises(ConfigError, match=r"timeout: invalid duration '1m30' \(expected e\.g\. .*'1m30s'\)"):
        compile_short({"ingress": {"port": 80, "to": 8080, "timeout": "1m30"}}, "127.0.0.2")
    with pytest.raises(ConfigError, match="must not be negative"):
        compile_short({"ingress": {"port": 80, "to": 8080, "timeout": "-1s"}}, "127.0.0.2")
    # and the sidecar process itself accepts it (what meshctl validate accepted must also run)
    path = tmp_path / "sidecar.json"
    path.write_text(json.dumps({"ingress": {"port": 80, "to": 8080, "timeout": "1m30s"}}))
    r = subprocess.run([sys.executable, "-m", "sidecar", "--pod-ip", POD, "--config", str(path), "--check"],
                       cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
