"""Peers for side-by-side benchmarks: nginx (backend / reverse proxy) and haproxy, started by pid.

Each peer gets its own config in a temp dir and its own loopback alias; it is
stopped by its pid when the benchmark ends (never by name).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psutil


def wait_port(ip: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex((ip, port)) == 0:
                return
        time.sleep(0.02)
    raise RuntimeError(f"nothing listening on {ip}:{port} after {timeout}s")


class Peer:
    def __init__(self, name: str, argv: list[str], ip: str, port: int) -> None:
        self.name = name
        self.argv = argv
        self.ip = ip
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Peer:
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        wait_port(self.ip, self.port)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(5)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(5)


def require(binary: str) -> str:
    path = shutil.which(binary) or (f"/usr/sbin/{binary}" if os.path.exists(f"/usr/sbin/{binary}") else None)
    if not path:
        raise SystemExit(f"bench: {binary} is not installed (make bench installs it: apt-get install {binary})")
    return path


def nginx(workdir: Path, ip: str, port: int, upstream: tuple[str, int] | None = None) -> Peer:
    """A static 200 backend, or (with ``upstream``) a keep-alive reverse proxy."""
    conf = workdir / f"nginx-{ip}-{port}.conf"
    if upstream is None:
        location = 'return 200 "hello from nginx\\n";'
        up = ""
    else:
        location = ("proxy_pass http://backend; proxy_http_version 1.1; "
                    'proxy_set_header Connection "";')
        up = f"upstream backend {{ server {upstream[0]}:{upstream[1]}; keepalive 64; }}"
    conf.write_text(f"""
worker_processes 1;
daemon off;
pid {workdir}/nginx-{port}.pid;
error_log /dev/null crit;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {workdir}/tmp-body; proxy_temp_path {workdir}/tmp-proxy;
  fastcgi_temp_path {workdir}/tmp-fcgi; uwsgi_temp_path {workdir}/tmp-uwsgi; scgi_temp_path {workdir}/tmp-scgi;
  keepalive_requests 1000000;
  {up}
  server {{ listen {ip}:{port}; location / {{ {location} }} }}
}}
""")
    return Peer("nginx", [require("nginx"), "-c", str(conf), "-e", "/dev/null"], ip, port)


def haproxy(workdir: Path, ip: str, port: int, upstream: tuple[str, int]) -> Peer:
    """haproxy in HTTP mode with keep-alive and one retry, like the sidecar's retry policy."""
    conf = workdir / f"haproxy-{port}.cfg"
    conf.write_text(f"""
global
  nbthread 1
  maxconn 4096
defaults
  mode http
  timeout connect 1s
  timeout client 30s
  timeout server 30s
  option http-keep-alive
  retries 2
  retry-on conn-failure response-timeout 500 502 503 504
frontend fe
  bind {ip}:{port}
  default_backend be
backend be
  http-reuse always
  server s1 {upstream[0]}:{upstream[1]}
""")
    return Peer("haproxy", [require("haproxy"), "-f", str(conf), "-db"], ip, port)


def temp_workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="mbench"))


# --- what a peer costs -----------------------------------------------------------------------------------------------


def process_tree(pid: int) -> list[psutil.Process]:
    """A peer and every process under it (workers, forked children): a proxy's cost is its whole tree's."""
    p = psutil.Process(pid)
    return [p, *p.children(recursive=True)]


def cpu_seconds(procs: list[psutil.Process]) -> float:
    """User + system CPU of ``procs`` so far; a process that has gone counts nothing."""
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def rss_bytes(procs: list[psutil.Process]) -> int:
    return sum(p.memory_info().rss for p in procs if p.is_running())
