"""The one client of a running supervisor's control API (``meshctl.supervisor.control_server``),
and of the sidecars' admin sockets.

Synchronous and tiny, so that ``meshctl ps`` does not pay for an event loop or
a web framework.
"""

from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path
from typing import Any


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a unix socket: the control API and the sidecars' admin sockets."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


class ControlError(Exception):
    """The supervisor could not be asked, or said no; ``status`` is its HTTP status when it answered."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def request(path: Path, method: str, url: str, timeout: float = 10.0) -> tuple[int, bytes]:
    """One HTTP request over a unix socket (the control API, a sidecar's admin socket): (status, body)."""
    conn = UnixHTTPConnection(str(path), timeout)
    try:
        conn.request(method, url)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def call(path: Path, method: str, url: str, timeout: float = 10.0) -> dict[str, Any]:
    """One request to the supervisor; raises ControlError with a readable reason."""
    try:
        status, raw = request(path, method, url, timeout)
        body = json.loads(raw or b"{}")
    except (OSError, ValueError, http.client.HTTPException) as exc:
        raise ControlError(f"cannot reach the supervisor at {path}: {exc}") from None
    if status >= 400:
        raise ControlError(body.get("error", f"HTTP {status}"), status)
    return body


def get_json(url: str, timeout: float = 10.0) -> tuple[int, Any]:
    """``GET url`` over TCP (the mesh's trace collector): (status, decoded JSON body, None when not JSON).

    Raises OSError or http.client.HTTPException when the server cannot be reached or answers garbage.
    """
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port or 80, timeout=timeout)
    try:
        conn.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""),
                     headers={"Accept": "application/json"})
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    try:
        return resp.status, json.loads(raw) if raw else None
    except ValueError:
        return resp.status, None
