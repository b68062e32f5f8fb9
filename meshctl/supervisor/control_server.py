"""The supervisor's side of the control plane: an HTTP API on a unix socket (mode 0600) in the state dir.

A unix socket rather than a TCP port: only the owner can talk to the
supervisor, and no address of the loopback range is spent on it. The one
client is ``meshctl.client`` (http.client, one request per connection).

HTTP/1.1 on asyncio streams, one request per connection (``Connection: close``), JSON bodies: the API is
eight routes without request bodies, and a web framework's import (aiohttp: ~150 ms of CPU) would compete
with the pods for the CPU during the very seconds the supervisor starts them.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

if TYPE_CHECKING:
    from meshctl.supervisor.supervisor import Supervisor

#: A request's line and headers must arrive within this long, and be at most this big.
HEAD_TIMEOUT_S = 30.0
MAX_HEAD_BYTES = 64 * 1024
#: The longest `GET /v1/status?wait=S` may wait for the mesh to settle.
MAX_WAIT_S = 300.0


class Request:
    def __init__(self, method: str, path: str, query: dict[str, str], match: dict[str, str]) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.match_info = match


Reply = tuple[int, Any]
Handler = Callable[[Request], Awaitable[Reply]]


def _routes(sup: Supervisor) -> list[tuple[str, tuple[str, ...], Handler]]:
    """(method, path segments with ``{name}`` placeholders, handler)."""

    async def status(request: Request) -> Reply:
        resources = request.query.get("resources") != "0"
        wait = request.query.get("wait")
        if wait:  # `up -d`: answer once every process is ready (or done, or broken), at most `wait` seconds on
            try:
                seconds = min(max(float(wait), 0.0), MAX_WAIT_S)
            except ValueError:
                return 400, {"error": f"wait: expected seconds, got {wait!r}"}
            await sup.settled(seconds)
        if resources:  # `?resources=0` (`up -d` waiting) stays cheap: it serves the listening sockets last found
            await sup.refresh_listening()
        return 200, sup.status(resources=resources)

    async def restart(request: Request) -> Reply:
        name = request.match_info["name"]
        procs = sup.find_processes(name, request.query.get("role"))
        if not procs:
            return 404, {"error": f"no pod or replica named {name!r}"}
        try:
            await sup.restart(procs)
        except RuntimeError as exc:
            return 409, {"error": str(exc)}
        return 200, {"restarted": [p.key for p in procs]}

    async def hosts(request: Request) -> Reply:
        name = request.match_info["name"]
        found = sup.hosts(name)
        if not found:
            return 404, {"error": f"no pod or replica named {name!r}"}
        return 200, {"hosts": found, "hosts_mode": sup.plan.hosts_mode}

    async def exec_target(request: Request) -> Reply:
        try:
            return 200, sup.exec_target(request.match_info["name"])
        except LookupError as exc:
            return 404, {"error": exc.args[0]}
        except RuntimeError as exc:
            return 409, {"error": str(exc)}

    async def prometheus_config(_: Request) -> Reply:
        return 200, {"config": sup.plan.prometheus_config}

    async def certs(_: Request) -> Reply:
        return 200, sup.certs()

    async def rotate(request: Request) -> Reply:
        try:
            return 200, {"rotated": sup.rotate_certs(request.match_info["name"])}
        except LookupError as exc:
            return 404, {"error": exc.args[0]}
        except RuntimeError as exc:
            return 409, {"error": str(exc)}

    async def down(_: Request) -> Reply:
        sup.request_stop()
        return 200, {"stopping": True}

    return [
        ("GET", ("v1", "status"), status),
        ("GET", ("v1", "hosts", "{name}"), hosts),
        ("GET", ("v1", "exec", "{name}"), exec_target),
        ("GET", ("v1", "prometheus-config"), prometheus_config),
        ("POST", ("v1", "restart", "{name}"), restart),
        ("POST", ("v1", "down"), down),
        ("GET", ("v1", "certs"), certs),
        ("POST", ("v1", "certs", "rotate", "{name}"), rotate),
    ]


def route(routes: list[tuple[str, tuple[str, ...], Handler]], method: str,
          path: str) -> tuple[Handler | None, dict[str, str], int]:
    """The handler for ``method path`` and its path parameters (percent-decoded); else None and 404 or 405."""
    segments = path.split("/")
    if not segments or segments[0] != "":
        return None, {}, 404
    segments = segments[1:]
    allowed = False
    for m, pattern, handler in routes:
        if len(pattern) != len(segments):
            continue
        match: dict[str, str] = {}
        for want, got in zip(pattern, segments, strict=True):
            if want.startswith("{"):
                if not got:
                    break
                match[want[1:-1]] = unquote(got)
            elif unquote(got) != want:
                break
        else:
            if m == method:
                return handler, match, 200
            allowed = True
    return None, {}, 405 if allowed else 404


def _response(status: int, body: Any) -> bytes:
    data = json.dumps(body).encode()
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = ""
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json; charset=utf-8\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n").encode() + data


async def _read_head(reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str]] | None:
    """(method, target, headers) of one request; None when the client went away or sent nonsense."""
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT_S)
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, OSError):
        return None
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        return None
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return parts[0], parts[1], headers


class ControlServer:
    def __init__(self, sup: Supervisor) -> None:
        self.routes = _routes(sup)
        self.server: asyncio.AbstractServer | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            head = await _read_head(reader)
            if head is None:
                writer.write(_response(400, {"error": "bad request"}))
                return
            method, target, headers = head
            try:
                length = int(headers.get("content-length") or 0)
                if length:  # no route reads a body: drain it so that the client can read the answer
                    await asyncio.wait_for(reader.readexactly(length), HEAD_TIMEOUT_S)
            except (ValueError, asyncio.IncompleteReadError, TimeoutError, OSError):
                return
            url = urlsplit(target)
            query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
            handler, match, code = route(self.routes, method, url.path)
            if handler is None:
                writer.write(_response(code, {"error": f"{HTTPStatus(code).phrase}: {method} {url.path}"}))
                return
            try:
                status, body = await handler(Request(method, url.path, query, match))
            except Exception as exc:  # noqa: BLE001 - one broken request must not take the supervisor down
                status, body = 500, {"error": f"internal error: {type(exc).__name__}: {exc}"}
            writer.write(_response(status, body))
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self._connections.discard(task)
            writer.close()

    async def start(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        old = os.umask(0o177)  # the socket is born 0600: no window where others could connect
        try:
            self.server = await asyncio.start_unix_server(self._handle, str(path), limit=MAX_HEAD_BYTES)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)

    async def cleanup(self) -> None:
        """Stop listening; requests still being answered (a long wait) are cancelled."""
        if self.server is not None:
            self.server.close()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.wait(list(self._connections), timeout=2.0)


async def serve(sup: Supervisor, path: Path) -> ControlServer:
    server = ControlServer(sup)
    await server.start(path)
    return server
