"""The supervisor's side of the control plane: an HTTP API on a unix socket (mode 0600) in the state dir.

A unix socket rather than a TCP port: only the owner can talk to the
supervisor, and no address of the loopback range is spent on it. The one
client is ``meshctl.client``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aiohttp import web

    from meshctl.supervisor.supervisor import Supervisor


def build_app(sup: Supervisor) -> web.Application:
    from aiohttp import web  # the server side only: CLI commands stay quick to start

    async def status(request: web.Request) -> web.Response:
        resources = request.query.get("resources") != "0"
        if resources:  # `?resources=0` (`up -d` polling) stays cheap: it serves the listening sockets last found
            await sup.refresh_listening()
        return web.json_response(sup.status(resources=resources))

    async def restart(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        procs = sup.find_processes(name, request.query.get("role"))
        if not procs:
            return web.json_response({"error": f"no pod or replica named {name!r}"}, status=404)
        try:
            await sup.restart(procs)
        except RuntimeError as exc:
            return web.json_response({"error": str(exc)}, status=409)
        return web.json_response({"restarted": [p.key for p in procs]})

    async def hosts(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        found = sup.hosts(name)
        if not found:
            return web.json_response({"error": f"no pod or replica named {name!r}"}, status=404)
        return web.json_response({"hosts": found, "hosts_mode": sup.plan.hosts_mode})

    async def exec_target(request: web.Request) -> web.Response:
        try:
            return web.json_response(sup.exec_target(request.match_info["name"]))
        except LookupError as exc:
            return web.json_response({"error": exc.args[0]}, status=404)
        except RuntimeError as exc:
            return web.json_response({"error": str(exc)}, status=409)

    async def certs(_: web.Request) -> web.Response:
        return web.json_response(sup.certs())

    async def rotate(request: web.Request) -> web.Response:
        try:
            return web.json_response({"rotated": sup.rotate_certs(request.match_info["name"])})
        except LookupError as exc:
            return web.json_response({"error": exc.args[0]}, status=404)
        except RuntimeError as exc:
            return web.json_response({"error": str(exc)}, status=409)

    async def down(_: web.Request) -> web.Response:
        sup.request_stop()
        return web.json_response({"stopping": True})

    app = web.Application()
    app.router.add_get("/v1/status", status)
    app.router.add_get("/v1/hosts/{name}", hosts)
    app.router.add_get("/v1/exec/{name}", exec_target)
    app.router.add_get("/v1/prometheus-config", lambda _: web.json_response({"config": sup.plan.prometheus_config}))
    app.router.add_post("/v1/restart/{name}", restart)
    app.router.add_post("/v1/down", down)
    app.router.add_get("/v1/certs", certs)
    app.router.add_post("/v1/certs/rotate/{name}", rotate)
    return app


async def serve(sup: Supervisor, path: Path) -> web.AppRunner:
    from aiohttp import web

    path.unlink(missing_ok=True)
    runner = web.AppRunner(build_app(sup), access_log=None, handle_signals=False)
    await runner.setup()
    old = os.umask(0o177)  # the socket is born 0600: no window where others could connect
    try:
        site = web.UnixSite(runner, str(path))
        await site.start()
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    return runner
