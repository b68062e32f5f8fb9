"""The sidecar's admin interface against a real process: who may do what, filters that cannot wedge it, idle
connections. Addresses: 127.0.191.x only; ports are picked free.
"""

from __future__ import annotations

import os
import socket
import stat
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port, wait_for
from tests.test_sidecar_proxy import Resp, SidecarProc, admin_socket_request, request
from tests.upstreams import UpstreamServer, serve_upstream

POD = "127.0.191.1"
UPSTREAM = "127.0.191.2"


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[UpstreamServer, int]]:
    yield from serve_upstream(UPSTREAM)


def start(workdir: Path, upstream_port: int, *, admin_socket: bool = True, admin: dict | None = None) -> SidecarProc:
    admin_port, ingress = free_port(POD), free_port(POD)
    config = {"admin": {"port": admin_port, **(admin or {})}, "access_log": False,
              "ingress": {"port": ingress, "to": f"{UPSTREAM}:{upstream_port}"}}
    sc = SidecarProc(workdir, POD, admin_port, config=config, admin_socket=admin_socket)
    sc.ingress = ingress  # type: ignore[attr-defined]
    return sc.start()


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory, upstream: tuple[UpstreamServer, int]) -> Iterator[SidecarProc]:
    sc = start(tmp_path_factory.mktemp("sidecar_admin"), upstream[1], admin_socket=False)
    yield sc
    sc.stop()


@pytest.fixture(scope="module")
def with_socket(tmp_path_factory: pytest.TempPathFactory,
                upstream: tuple[UpstreamServer, int]) -> Iterator[SidecarProc]:
    sc = start(tmp_path_factory.mktemp("sidecar_admin_socket"), upstream[1])
    yield sc
    sc.stop()


def tcp(sc: SidecarProc, path: str, method: str = "GET", timeout: float = 10) -> Resp:
    return request(POD, sc.admin_port, path, method=method, timeout=timeout)


# --- D3: ?filter= is RE2, and the event loop never waits for it ------------------------------------------------------


def test_catastrophic_filter_does_not_stall_proxying(sidecar):
    # With a backtracking engine, ([a-z_]+)+X takes exponential time on every stat name with a long
    # [a-z_] run ("upstream_rq_retry_limit_exceeded"): the whole sidecar stopped answering.
    admin_result: list[Resp | BaseException] = []

    def admin_call() -> None:
        try:
            admin_result.append(tcp(sidecar, "/stats?filter=([a-z_]%2B)%2BX", timeout=10))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            admin_result.append(exc)

    th = threading.Thread(target=admin_call)
    th.start()
    try:
        latencies = []
        while th.is_alive() or len(latencies) < 5:  # proxied requests while the filter is (or was) running
            r = request(POD, sidecar.ingress, f"/echo?t={uuid.uuid4().hex[:8]}", host="svc", timeout=2)
            assert r.status == 200
            latencies.append(r.elapsed)
            if len(latencies) > 200:
                break
    finally:
        th.join(15)
    assert max(latencies) < 0.1, latencies
    assert admin_result and isinstance(admin_result[0], Resp), admin_result
    assert admin_result[0].status == 200 and admin_result[0].body == b""  # no stat name has an X


def test_filter_is_a_search_and_invalid_regex_is_400(sidecar):
    r = tcp(sidecar, "/stats?filter=retry_limit")
    assert r.status == 200
    lines = r.body.decode().splitlines()
    assert lines and all("retry_limit" in ln.partition(": ")[0] for ln in lines)
    j = tcp(sidecar, "/stats?format=json&filter=%5Ecluster%5C.local_service%5C.upstream_rq_time%24")
    assert j.status == 200
    doc = j.json()["stats"]
    assert [s for s in doc if "name" in s] == []
    assert [h["name"] for h in doc[-1]["histograms"]["computed_quantiles"]] == [
        "cluster.local_service.upstream_rq_time"]
    bad = tcp(sidecar, "/stats?filter=(")
    assert (bad.status, bad.body) == (400, b"Invalid re2 regex: missing ): (")  # Envoy's reply, verbatim
    backref = tcp(sidecar, "/stats?filter=(a)%5C1")  # a backreference is not RE2
    assert backref.status == 400 and backref.body.startswith(b"Invalid re2 regex: ")


# --- D4: the TCP port is read-only; the admin socket does the rest ------------------------------------------------


def test_admin_socket_is_private(with_socket):
    assert with_socket.admin_socket is not None
    st = os.stat(with_socket.admin_socket)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert tcp(with_socket, "/config_dump").status == 403  # having a socket opens nothing on TCP
    assert tcp(with_socket, "/quitquitquit", method="POST").status == 403 and with_socket.alive()


@pytest.mark.parametrize("path, method", [("/quitquitquit", "POST"), ("/healthcheck/fail", "POST"),
                                          ("/healthcheck/ok", "POST"), ("/config_dump", "GET")])
def test_tcp_refuses_mutating_and_secret_endpoints(sidecar, path, method):
    r = tcp(sidecar, path, method=method)
    assert r.status == 403
    assert b"only served on the admin socket" in r.body
    assert sidecar.alive()
    assert tcp(sidecar, "/ready").status == 200  # nothing happened


@pytest.mark.parametrize("path", ["/stats", "/stats?format=json", "/stats/prometheus", "/ready", "/clusters",
                                  "/server_info", "/"])
def test_tcp_serves_read_only_endpoints(sidecar, path):
    assert tcp(sidecar, path).status == 200


def test_admin_socket_serves_everything(tmp_path, upstream):
    sc = start(tmp_path, upstream[1])
    try:
        sock = sc.admin_socket
        assert sock is not None
        dump = admin_socket_request(sock, "/config_dump")
        assert dump.status == 200 and "configs" in dump.json()
        assert admin_socket_request(sock, "/stats/prometheus").status == 200
        assert admin_socket_request(sock, "/healthcheck/fail", method="POST").status == 200
        assert tcp(sc, "/ready").status == 503
        assert admin_socket_request(sock, "/healthcheck/ok", method="POST").status == 200
        assert tcp(sc, "/ready").status == 200
        assert admin_socket_request(sock, "/quitquitquit", method="POST").status == 200
        assert sc.proc is not None and sc.proc.wait(10) == 0
        assert not os.path.exists(sock)  # removed on the way out
    finally:
        sc.stop()


def test_without_admin_socket_mutating_endpoints_are_unavailable(tmp_path, upstream):
    sc = start(tmp_path, upstream[1], admin_socket=False)
    try:
        r = tcp(sc, "/quitquitquit", method="POST")
        assert r.status == 403 and b"--admin-socket" in r.body
        assert tcp(sc, "/healthcheck/fail", method="POST").status == 403
        assert tcp(sc, "/ready").status == 200 and sc.alive()
    finally:
        sc.stop()


def test_stale_admin_socket_is_replaced_live_one_is_not(tmp_path, upstream):
    stale = tmp_path / "admin.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))  # a socket file nobody listens on: what a killed sidecar leaves behind
    s.close()
    sc = start(tmp_path, upstream[1])
    try:
        assert admin_socket_request(str(stale), "/ready").status == 200
        second = SidecarProc(tmp_path / "second", POD, free_port(POD), config={
            "admin": {"port": free_port(POD)}, "access_log": False}, admin_socket=False)
        second.args += ["--admin-socket", str(stale)]
        with pytest.raises(AssertionError, match="in use by another process"):
            second.start()
        assert admin_socket_request(str(stale), "/ready").status == 200  # the first one still owns it
    finally:
        sc.stop()


# --- D6: idle admin connections are closed -----------------------------------------------------------------------


def _closed_by_server(s: socket.socket, timeout: float) -> bool:
    s.settimeout(timeout)
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_idle_admin_connections_are_closed(tmp_path, upstream):
    sc = start(tmp_path, upstream[1], admin={"idle_timeout": "0.3s"})
    try:
        silent = socket.create_connection((POD, sc.admin_port), timeout=5)
        used = socket.create_connection((POD, sc.admin_port), timeout=5)
        used.sendall(f"GET /ready HTTP/1.1\r\nHost: {POD}\r\n\r\n".encode())
        assert used.recv(65536).startswith(b"HTTP/1.1 200 ")
        assert sc.admin_socket is not None
        on_socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        on_socket.connect(sc.admin_socket)
        t0 = time.monotonic()
        for s in (silent, used, on_socket):
            with s:
                assert _closed_by_server(s, 5), "an idle admin connection was kept open"
        assert time.monotonic() - t0 < 5
        assert wait_for(lambda: tcp(sc, "/ready").status == 200, 2)  # new connections are still served
    finally:
        sc.stop()
