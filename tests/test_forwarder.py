"""The publish forwarder: half-closes pass through, and it closes what it opens (no descriptor leak)."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from tests.conftest import free_port, wait_for

#: Greets, reads the request until the client half-closes, answers, closes.
ONE_SHOT_SERVER = """
import socketserver, sys

class Handler(socketserver.BaseRequestHandler):
    def handle(self):
        self.request.sendall(b"hello\\n")
        data = b""
        while chunk := self.request.recv(65536):
            data += chunk
        self.request.sendall(b"got " + data)

socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer.daemon_threads = True
socketserver.ThreadingTCPServer((sys.argv[1], 8000), Handler).serve_forever()
"""


def _read_all(s: socket.socket) -> bytes:
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


def after_greeting(addr: tuple[str, int], payload: bytes) -> bytes:
    """The greeting proves the forwarder has linked both sides before the client half-closes."""
    with socket.create_connection(addr, timeout=5) as s:
        greeting = s.recv(6)
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        return greeting + _read_all(s)


def at_once(addr: tuple[str, int], payload: bytes) -> bytes:
    """Request and half-close before the forwarder can have connected upstream."""
    with socket.create_connection(addr, timeout=5) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        return _read_all(s)


@pytest.mark.parametrize(("client", "pod_ip", "host_ip"), [
    (after_greeting, "127.0.211.1", "127.0.212.1"),
    (at_once, "127.0.213.1", "127.0.214.1"),
])
def test_half_closed_connections_are_answered_and_leave_no_descriptors(
        meshctl, client: Callable[[tuple[str, int], bytes], bytes], pod_ip: str, host_ip: str) -> None:
    server = Path(meshctl.workdir) / "oneshot.py"
    server.write_text(ONE_SHOT_SERVER)
    port = free_port(host_ip)
    project = f"fwd-{client.__name__.replace('_', '-')}"
    topo = meshctl.write("fwd.yaml", f"""
        pods:
          oneshot:
            ip: {pod_ip}
            publish: ["{host_ip}:{port}:8000"]
            service:
              command: [python, "{server}", "${{POD_IP}}"]
              ready: {{tcp: 8000}}
    """)
    meshctl.up(topo, project)
    supervisor = psutil.Process(meshctl.record(project)["supervisor"]["pid"])
    addr = (host_ip, port)
    assert client(addr, b"warm-up") == b"hello\ngot warm-up"
    baseline = supervisor.num_fds()
    for i in range(200):
        assert client(addr, b"ping %d" % i) == b"hello\ngot ping %d" % i
    assert wait_for(lambda: supervisor.num_fds() <= baseline + 2, 10), (baseline, supervisor.num_fds())
