"""``meshctl dashboard``: the live mesh as a picture in the browser.

One poller feeds plain state: every interval it asks the followed mesh's supervisor and sidecars through the same
``Collector`` that ``meshctl stats`` uses (so the numbers are the same computation, not a second one), turns the
snapshot into a *view* (the JSON documented in ``docs/dashboard.md``) and hands it to every open page over
Server-Sent Events. A slow browser never holds the poller up: each client gets the newest view when it is ready
for one, views it missed are skipped, not queued.

The mesh followed is ``-p NAME``, or else the only running mesh. While it is not running, views say so
(``running: false``) and the poller keeps looking: the page recovers by itself when the mesh (re)starts, with
fresh windows.

Every process on the host can reach 127.0.0.1, every pod included (they all live on 127.0.0.0/8), and the
dashboard shows log lines: like Jupyter, the server makes a token at start and serves only requests that carry it
(``?token=``, then an HttpOnly SameSite=Strict cookie).
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import json
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from meshctl.client import ControlError
from meshctl.observe.collector import Collector
from meshctl.observe.logs import last_lines, log_files
from meshctl.state import StateDir, running_meshes
from meshctl.supervisor.states import State

log = logging.getLogger("meshctl.dashboard")

ASSETS = Path(__file__).with_name("dashboard_assets")
COOKIE = "meshctl_dashboard"
LOG_LINES = 40
TRACES = 10


class DashboardError(Exception):
    """A reason the dashboard cannot start, in one line (the port is taken, ...)."""


class Dashboard:
    """The poller and its latest view."""

    def __init__(self, project: str | None, window_s: float = 10.0, interval_s: float = 1.0) -> None:
        self.project = project
        self.window_s = window_s
        self.interval_s = interval_s
        self.state: StateDir | None = StateDir.for_mesh(project) if project else None
        self.collector: Collector | None = None
        self.view: dict[str, Any] = {}  # set by the first refresh(), before the page is served
        self.version = 0
        self.changed = asyncio.Condition()

    # -- the poller ------------------------------------------------------------------------------------------------
    async def run(self) -> None:
        """Poll forever, one view per interval (the first view is computed by ``refresh`` before serving)."""
        due = time.monotonic()
        try:
            while True:
                due = max(due + self.interval_s, time.monotonic())  # after a slow poll: the next at once
                await asyncio.sleep(due - time.monotonic())
                await self.refresh()
        finally:
            await self._drop_collector()

    async def refresh(self) -> None:
        await self.publish(await self.compute())

    async def publish(self, view: dict[str, Any]) -> None:
        async with self.changed:
            self.view = view
            self.version += 1
            self.changed.notify_all()

    async def compute(self) -> dict[str, Any]:
        """The next view: the mesh's, or why there is none."""
        state, why = self._follow()
        if state is None:
            await self._drop_collector()
            return self._not_running(why)
        if self.collector is None or self.collector.state.mesh != state.mesh:
            await self._drop_collector()
            self.collector = await Collector(state, self.window_s).__aenter__()
        try:
            await self.collector.poll()
        except (OSError, ValueError, KeyError, aiohttp.ClientError, ControlError) as exc:
            # the mesh stopped between the check and the poll, or is going down: say so, start afresh later
            await self._drop_collector()
            if not state.supervisor_alive():
                return self._not_running(f"mesh '{state.mesh}' is not running")
            return self._not_running(f"cannot read the mesh's stats: {exc}", mesh=state.mesh)
        return self._view(self.collector)

    def _follow(self) -> tuple[StateDir | None, str]:
        """The mesh to show now: -p NAME, else the only running one (or the one shown, while it runs)."""
        if self.project is not None:
            assert self.state is not None
            if self.state.supervisor_alive():
                return self.state, ""
            return None, f"mesh '{self.project}' is not running"
        pool = running_meshes()
        if self.state is not None and any(s.mesh == self.state.mesh for s in pool):
            return self.state, ""
        if len(pool) == 1:
            self.state = pool[0]
            return self.state, ""
        if not pool:
            return None, "no mesh is running (start one with `meshctl up FILE`)"
        return None, "several meshes are running: " + ", ".join(s.mesh for s in pool) + "; pick one with -p NAME"

    async def _drop_collector(self) -> None:
        if self.collector is not None:
            collector, self.collector = self.collector, None
            await collector.__aexit__(None, None, None)

    def _not_running(self, message: str, mesh: str | None = None) -> dict[str, Any]:
        return {"mesh": mesh or (self.state.mesh if self.state is not None else None), "running": False,
                "message": f"mesh not running: {message}" if mesh is None else message, "time": time.time(),
                "window_s": self.window_s, "measured_s": None, "traced": False, "pods": [], "edges": []}

    @staticmethod
    def _view(collector: Collector) -> dict[str, Any]:
        """The stats snapshot (``meshctl stats -o json``'s document) plus what only a picture needs."""
        doc = collector.snapshot().to_json()
        status = collector.status
        for row in doc["pods"]:
            pod = collector.pods.get(row["pod"], {})
            procs = [p for p in status.get("processes", []) if p["pod"] == row["pod"]]
            row["replicas"] = [r["replica"] for r in pod.get("replicas", [])]
            row["engine"] = (pod.get("sidecar") or {}).get("engine")
            row["crashloop"] = any(p["state"] == State.CRASHLOOP for p in procs)
        return {**doc, "running": True, "message": None, "time": time.time(), "traced": bool(status.get("tracing"))}

    # -- a pod's details ----------------------------------------------------------------------------------------------
    async def pod_details(self, name: str) -> dict[str, Any] | None:
        """Processes, last log lines, recent traces and faults of one pod; None if the mesh has no such pod."""
        collector = self.collector
        if collector is None or name not in collector.pods:
            return None
        status = collector.status
        procs = [{k: p.get(k) for k in ("replica", "role", "pid", "state", "ready", "restarts", "cpu_percent",
                                        "rss_bytes", "last_exit")}
                 for p in status.get("processes", []) if p["pod"] == name]
        loop = asyncio.get_running_loop()
        logs = await loop.run_in_executor(None, _logs, collector.state, name)
        traces = None
        tracing = status.get("tracing")
        if tracing:
            traces = await loop.run_in_executor(None, _traces, tracing["query_url"], collector.state.mesh, name)
        faults = [f for f in collector.faults if f["pod"] == name]
        return {"pod": name, "processes": procs, "logs": logs, "traces": traces, "faults": faults}


def _logs(state: StateDir, pod: str) -> list[dict[str, Any]]:
    out = []
    for label, path in log_files(state, pod, None):
        replica, _, role = label.partition("/")
        try:
            lines, _ = last_lines(path, LOG_LINES)
        except OSError:
            lines = []
        out.append({"replica": replica, "role": role,
                    "lines": [ln.decode("utf-8", "replace").rstrip("\n") for ln in lines]})
    return out


def _traces(query_url: str, mesh: str, pod: str) -> list[dict[str, Any]]:
    from meshctl.tracing.tree import summary
    from meshctl.tracing.view import TraceError, TraceReader

    try:
        traces = TraceReader(query_url, mesh, timeout=2.0).traces(TRACES, service=pod)
    except TraceError:
        return []
    out = []
    for spans in traces:
        s = summary(spans)
        root = s["root"]
        out.append({"trace_id": s["traceId"], "root": f"{root['service']}: {root['path'] or root['name']}",
                    "start_ms": s["start_us"] // 1000 if s["start_us"] else None, "duration_ms": s["duration_ms"],
                    "spans": s["span_count"], "services": s["services"], "errors": s["errors"],
                    "retries": s["retries"]})
    return out


# -- HTTP -------------------------------------------------------------------------------------------------------------


def make_app(dashboard: Dashboard, token: str | None) -> web.Application:
    """The page, its assets and the JSON/SSE API; with ``token``, only for requests that carry it."""

    @web.middleware
    async def guard(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                    ) -> web.StreamResponse:
        if token is None:
            return await handler(request)
        given = request.query.get("token")
        if given is not None and hmac.compare_digest(given, token):
            response = await handler(request)
            response.set_cookie(COOKIE, token, httponly=True, samesite="Strict")
            return response
        cookie = request.cookies.get(COOKIE)
        if cookie is not None and hmac.compare_digest(cookie, token):
            return await handler(request)
        return web.Response(status=403, text="forbidden: open the URL `meshctl dashboard` printed (it carries the "
                                             "token)\n")

    async def index(_: web.Request) -> web.StreamResponse:
        return web.FileResponse(ASSETS / "index.html", headers={"Cache-Control": "no-cache"})

    async def asset(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        path = ASSETS / name
        if "/" in name or name.startswith(".") or not path.is_file():
            raise web.HTTPNotFound(text="no such asset\n")
        return web.FileResponse(path, headers={"Cache-Control": "no-cache"})

    async def api_view(_: web.Request) -> web.Response:
        return web.json_response(dashboard.view)

    async def api_pod(request: web.Request) -> web.Response:
        name = request.match_info["pod"]
        details = await dashboard.pod_details(name)
        if details is None:
            return web.json_response({"error": f"no pod '{name}' in the mesh shown"}, status=404)
        return web.json_response(details)

    async def api_events(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               "X-Accel-Buffering": "no"})
        await response.prepare(request)
        seen = -1
        try:
            while True:
                async with dashboard.changed:
                    while dashboard.version == seen:
                        await dashboard.changed.wait()
                    seen, view = dashboard.version, dashboard.view
                await response.write(b"event: view\ndata: " + json.dumps(view).encode() + b"\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            pass  # the page went away (or we are stopping)
        return response

    app = web.Application(middlewares=[guard])
    app.router.add_get("/", index)
    app.router.add_get("/assets/{name}", asset)
    app.router.add_get("/api/view", api_view)
    app.router.add_get("/api/events", api_events)
    app.router.add_get("/api/pods/{pod}", api_pod)
    return app


async def serve(dashboard: Dashboard, host: str, port: int, token: str | None,
                on_ready: Callable[[str], None]) -> None:
    """Serve until cancelled; ``on_ready(url)`` once the port is bound. A port that cannot be bound raises
    DashboardError (one line)."""
    runner = web.AppRunner(make_app(dashboard, token), access_log=None, handle_signals=False)
    await runner.setup()
    await dashboard.refresh()  # the first page shows the mesh, not a placeholder
    poller = asyncio.get_running_loop().create_task(dashboard.run())
    try:
        site = web.TCPSite(runner, host, port, shutdown_timeout=0.5)
        try:
            await site.start()
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise DashboardError(f"cannot listen on {host}:{port}: {reason}"
                                 + (" (another dashboard? pick one with --port)" if exc.errno == errno.EADDRINUSE
                                    else "")) from None
        bound = runner.addresses[0][1] if runner.addresses else port  # --port 0: the one the kernel chose
        shown = f"[{host}]" if ":" in host else host
        on_ready(f"http://{shown}:{bound}/" + (f"?token={token}" if token else ""))
        await asyncio.Event().wait()
    finally:
        poller.cancel()
        await asyncio.gather(poller, return_exceptions=True)
        await runner.cleanup()


def new_token() -> str:
    return secrets.token_urlsafe(24)
