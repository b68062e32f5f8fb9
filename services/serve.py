"""``http.ListenAndServe`` for the demo services: where to listen, and how to stop.

Both services read their addresses from the environment, bind the pod's
alias instead of "all interfaces" (see ``pods.loopback.bind_host``), and must
behave well under a supervisor: configuration errors are one line and a
distinct exit code, SIGTERM is a clean exit 0 within a fraction of a second.
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import sys
from dataclasses import dataclass

from aiohttp import web

from pods.loopback import bind_host
from pods.runloop import run as run_loop
from services import golog

# In-flight requests get this long after SIGTERM; supervisors expect a prompt exit.
_SHUTDOWN_GRACE = 0.5

EXIT_USAGE = 2


@dataclass(frozen=True)
class Listener:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class BindError(Exception):
    pass


def listener_from_env(host_var: str, port_var: str, *, required: bool) -> Listener | None:
    """The address named by ``host_var``/``port_var``; exits 2 on a bad port.

    A missing optional port means "no such listener" (Go would pick a random
    port nobody could find, which is no more useful).
    """
    raw = os.environ.get(port_var, "").strip()
    if not raw and not required:
        return None
    try:
        port = int(raw, 10)
    except ValueError:
        port = -1
    if not 0 < port < 65536:
        print(f"invalid {port_var} {raw!r}: need a TCP port 1-65535", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)
    return Listener(bind_host(os.environ.get(host_var), os.environ.get("POD_IP")), port)


def service_listeners() -> list[Listener]:
    """SERVICE_HOST:SERVICE_PORT, then METRICS_HOST:METRICS_PORT when set and distinct."""
    main = listener_from_env("SERVICE_HOST", "SERVICE_PORT", required=True)
    metrics = listener_from_env("METRICS_HOST", "METRICS_PORT", required=False)
    return [main] + ([metrics] if metrics and metrics != main else [])


def _bind_message(listener: Listener, exc: OSError) -> str:
    # Go's wording, e.g. "listen tcp 127.0.0.1:80: bind: permission denied".
    reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
    op = "bind" if exc.errno in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL) else "listen"
    return f"listen tcp {listener}: {op}: {reason}"


async def _serve(app: web.Application, listeners: list[Listener]) -> None:
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=_SHUTDOWN_GRACE)
    await runner.setup()
    try:
        for listener in listeners:
            try:
                await web.TCPSite(runner, listener.host, listener.port).start()
            except OSError as exc:
                raise BindError(_bind_message(listener, exc)) from None
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()


def run(app: web.Application, listeners: list[Listener]) -> None:
    """Serve until SIGTERM/SIGINT, then exit 0; a bind failure is Go's ``log.Fatal`` (exit 1).

    Unlike Go, a metrics port that cannot be bound is fatal too: a pod that runs
    without its metrics would silently vanish from the dashboards.
    """
    try:
        run_loop(_serve(app, listeners))
    except BindError as exc:
        golog.fatal(exc)
