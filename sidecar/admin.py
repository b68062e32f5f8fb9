"""The admin interface, with Envoy's paths and formats.

Served by the same HTTP/1 protocol as the data path (no web framework: the
sidecar's memory budget is 25 MB). Bound to the pod alias unless the
topology opts in to a public address.

Two doors: the TCP port is reachable by every pod and local user, so it only
serves what Prometheus and readiness probes read; what changes the sidecar's
state or shows its configuration is served on the admin Unix socket
(``--admin-socket``, mode 0600), and answers 403 on TCP.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from sidecar.config import CircuitBreakers
from sidecar.safe_regex import RegexError, compile_regex
from sidecar.server import DownstreamProtocol, Handler, HandlerOnly, Stream

if TYPE_CHECKING:
    from sidecar.app import Sidecar

VERSION = "meshctl-sidecar/0.1.0 (Envoy-compatible admin subset)"
JSON = b"application/json"
#: Served on the TCP port too: read-only and free of secrets (Prometheus, readiness probes, meshctl stats).
PUBLIC_PATHS = frozenset({"/", "/stats", "/stats/prometheus", "/clusters", "/ready", "/server_info"})
#: A ?filter= search over all stat names gives up after this long (RE2 is linear, but in pattern size too).
FILTER_BUDGET_S = 2.0



log = logging.getLogger("sidecar.admin")


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [_jsonable(x) for x in obj]
    if isinstance(obj, frozenset | set):
        return sorted(_jsonable(x) for x in obj)
    if isinstance(obj, re.Pattern) or hasattr(obj, "fullmatch"):  # re or RE2: the pattern as configured
        return obj.pattern
    if isinstance(obj, bytes):
        return obj.decode("utf-8", "replace")
    return obj


class AdminConnections(HandlerOnly):
    """The admin's connection manager: its connections join the sidecar's idle sweep, like a listener's,
    so a client that connects and goes silent cannot hold one forever."""

    def __init__(self, handler: Handler, connections: set[DownstreamProtocol]) -> None:
        super().__init__(handler)
        self.connections = connections

    def on_connection_open(self, conn: DownstreamProtocol) -> None:
        self.connections.add(conn)

    def on_connection_close(self, conn: DownstreamProtocol) -> None:
        self.connections.discard(conn)


def _search_all(rx: Any, names: list[str], deadline: float) -> set[str] | None:
    """The names ``rx`` finds something in; None when past ``deadline`` (runs in the regex thread: RE2
    releases the GIL, so the event loop keeps serving meanwhile)."""
    out = set()
    for name in names:
        if rx.search(name):
            out.add(name)
        if time.monotonic() > deadline:
            return None
    return out


class Admin:
    def __init__(self, sidecar: Sidecar, socket_path: str | None = None) -> None:
        self.sidecar = sidecar
        self.socket_path = socket_path
        self._searches: set[asyncio.Task[None]] = set()
        self._regex_thread: ThreadPoolExecutor | None = None  # one: concurrent filters queue, never pile up cores
        self.routes: dict[str, tuple[str, Callable[[Stream, dict[str, list[str]]], None], str]] = {
            "/": ("GET", self.index, "this page"),
            "/stats": ("GET", self.stats, "counters, gauges, histograms (?format=json|prometheus, ?filter=RE)"),
            "/stats/prometheus": ("GET", self.prometheus, "stats in Prometheus text format, Envoy's tags"),
            "/clusters": ("GET", self.clusters, "upstream clusters and endpoints (?format=json)"),
            "/config_dump": ("GET", self.config_dump, "the running configuration"),
            "/ready": ("GET", self.ready, "200 LIVE when serving, 503 otherwise"),
            "/server_info": ("GET", self.server_info, "version, state, uptime"),
            "/quitquitquit": ("POST", self.quit, "drain and exit"),
            "/healthcheck/fail": ("POST", self.hc_fail, "fail readiness (state DRAINING)"),
            "/healthcheck/ok": ("POST", self.hc_ok, "pass readiness again"),
            "/runtime": ("GET", self.runtime, "runtime overrides (JSON, like Envoy's)"),
            "/runtime_modify": ("POST", self.runtime_modify,
                                "set runtime keys: ?key=value (an empty value removes it)"),
        }

    def handle_tcp(self, stream: Stream) -> None:
        """A request on the TCP port: anyone who can reach the pod."""
        self._handle(stream, trusted=False)

    def handle_socket(self, stream: Stream) -> None:
        """A request on the admin socket: only the sidecar's own user can connect (mode 0600)."""
        self._handle(stream, trusted=True)

    def _handle(self, stream: Stream, trusted: bool) -> None:
        path, _, query = stream.url.decode("latin-1").partition("?")
        entry = self.routes.get(path)
        if entry is None:
            stream.reply(404, b"invalid path. admin commands are:\n" + self._help())
            return
        if not trusted and path not in PUBLIC_PATHS:
            where = (f"on the admin socket {self.socket_path}" if self.socket_path
                     else "on the admin socket, and this sidecar has none (--admin-socket PATH)")
            stream.reply(403, f"{path} is only served {where}\n".encode())
            return
        method, fn, _ = entry
        if method == "POST" and stream.method != b"POST":
            stream.reply(405, b"This endpoint requires POST\n")
            return
        q = parse_qs(query)
        prepare = getattr(self.sidecar, "prepare_admin", None)  # a parent of workers (sidecar.workers.Parent)
        if prepare is not None:
            step = prepare(path, stream, q)
            if step is not None:
                self._spawn(self._after(step, fn, stream, q))
                return
        fn(stream, q)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._searches.add(task)  # the loop keeps only a weak reference to a task
        task.add_done_callback(self._searches.discard)

    @staticmethod
    async def _after(step: Any, fn: Callable[[Stream, dict[str, list[str]]], None], stream: Stream,
                     q: dict[str, list[str]]) -> None:
        """Answer once the workers did their part (aggregated stats, a change every worker applied)."""
        try:
            answered = await step
        except Exception as exc:  # a bug must cost one admin answer, never the admin
            log.exception("admin: asking the workers failed")
            stream.reply(500, f"asking the workers failed: {type(exc).__name__}\n".encode())
            return
        if not answered:
            fn(stream, q)

    def _help(self) -> bytes:
        return "".join(f"  {p}: {d}{'' if p in PUBLIC_PATHS else ' [admin socket only]'}\n"
                       for p, (_, _, d) in self.routes.items()).encode()

    def index(self, stream: Stream, q: dict[str, list[str]]) -> None:
        stream.reply(200, b"admin commands are:\n" + self._help())

    def stats(self, stream: Stream, q: dict[str, list[str]]) -> None:
        fmt = q.get("format", ["text"])[0]
        filt = q.get("filter", [None])[0]
        used_only = "usedonly" in q
        store = self.sidecar.store
        self.sidecar.refresh_server_stats()
        if fmt == "prometheus":
            self.prometheus(stream, q)
            return
        if not filt:
            self._reply_stats(stream, fmt, store.render_json(None, used_only) if fmt == "json"
                              else store.render_text(None, used_only))
            return
        # Envoy's filter is an RE2 regex: linear time, no backtracking (a Python `re` pattern such as
        # ([a-z_]+)+X takes exponential time and would wedge the event loop, the data path included).
        try:
            rx = compile_regex(filt)
        except RegexError as exc:
            stream.reply(400, f"Invalid re2 regex: {exc}".encode())
            return
        rendered = store.render_json(None, used_only) if fmt == "json" else store.render_text(None, used_only)
        task = asyncio.get_running_loop().create_task(self._filtered(stream, rx, fmt, rendered))
        self._searches.add(task)  # the loop keeps only a weak reference to a task
        task.add_done_callback(self._searches.discard)

    async def _filtered(self, stream: Stream, rx: Any, fmt: str, rendered: Any) -> None:
        """Search the stat names off the loop, then answer with the rendering narrowed to the matches."""
        if fmt == "json":
            stats = rendered["stats"]
            hists = stats[-1]["histograms"]["computed_quantiles"] if stats and "histograms" in stats[-1] else []
            names = [s["name"] for s in stats if "name" in s] + [h["name"] for h in hists]
        else:
            lines = rendered.splitlines()
            names = [ln.partition(": ")[0] for ln in lines]
        if self._regex_thread is None:
            self._regex_thread = ThreadPoolExecutor(1, thread_name_prefix="admin-filter")
        try:
            keep = await asyncio.get_running_loop().run_in_executor(
                self._regex_thread, _search_all, rx, names, time.monotonic() + FILTER_BUDGET_S)
        except RuntimeError:  # the executor was shut down: the sidecar is stopping
            return
        if keep is None:
            log.warning("stats filter %r gave up after %.1f s", rx.pattern, FILTER_BUDGET_S)
            stream.reply(503, f"filter took longer than {FILTER_BUDGET_S:g} s; simplify the regex\n".encode())
            return
        if fmt == "json":
            rendered["stats"] = [s for s in stats if s.get("name", "") in keep or "histograms" in s]
            hists[:] = [h for h in hists if h["name"] in keep]
        else:
            rendered = "".join(ln + "\n" for ln, n in zip(lines, names, strict=True) if n in keep)
        self._reply_stats(stream, fmt, rendered)

    @staticmethod
    def _reply_stats(stream: Stream, fmt: str, rendered: Any) -> None:
        if fmt == "json":
            stream.reply(200, json.dumps(rendered).encode(), content_type=JSON)
        else:
            stream.reply(200, rendered.encode())

    def close(self) -> None:
        """Stop the filter thread (a search under way ends at its deadline; nobody waits for it)."""
        if self._regex_thread is not None:
            self._regex_thread.shutdown(wait=False, cancel_futures=True)

    def prometheus(self, stream: Stream, q: dict[str, list[str]]) -> None:
        self.sidecar.refresh_server_stats()
        stream.reply(200, self.sidecar.store.render_prometheus().encode(),
                     content_type=b"text/plain; version=0.0.4; charset=utf-8")

    def clusters(self, stream: Stream, q: dict[str, list[str]]) -> None:
        rows = []
        out: list[dict[str, Any]] = []
        for c in self.sidecar.clusters.values():
            rows.append(f"{c.name}::observability_name::{c.name}")
            od = c.outlier
            if od is not None:  # Envoy prints these once the cluster has an outlier detector
                sr, th = (_sr(od.sr_average), _sr(od.sr_threshold))
                rows += [f"{c.name}::outlier::success_rate_average::{sr}",
                         f"{c.name}::outlier::success_rate_ejection_threshold::{th}",
                         f"{c.name}::outlier::local_origin_success_rate_average::-1",
                         f"{c.name}::outlier::local_origin_success_rate_ejection_threshold::-1"]
            rows.append(f"{c.name}::default_priority::max_connections::{c.breakers.max_connections}")
            rows.append(f"{c.name}::default_priority::max_pending_requests::{c.breakers.max_pending_requests}")
            rows.append(f"{c.name}::default_priority::max_requests::{c.breakers.max_requests}")
            rows.append(f"{c.name}::default_priority::max_retries::{c.breakers.max_retries}")
            hp = CircuitBreakers()  # HIGH-priority thresholds: Envoy's defaults (we parse only DEFAULT ones)
            rows += [f"{c.name}::high_priority::{n}::{getattr(hp, n)}"
                     for n in ("max_connections", "max_pending_requests", "max_requests", "max_retries")]
            rows.append(f"{c.name}::added_via_api::false")
            hosts = []
            for p in c.pools:
                a = p.address
                flags = ("/failed_active_hc" if p.hc_failed else "") + ("/failed_outlier_check" if p.ejected else "")
                rows += [f"{c.name}::{a}::cx_active::{len(p.idle)}", f"{c.name}::{a}::rq_active::{p.active_requests}",
                         f"{c.name}::{a}::health_flags::{flags or 'healthy'}", f"{c.name}::{a}::weight::1"]
                status: dict[str, Any] = {"eds_health_status": "HEALTHY"}
                if p.hc_failed:
                    status["failed_active_health_check"] = True
                if p.ejected:
                    status["failed_outlier_check"] = True
                hosts.append({"address": {"socket_address": {"address": p.host, "port_value": p.port}},
                              "stats": [{"name": "rq_active", "value": p.active_requests}],
                              "health_status": status, "weight": 1})
            out.append({"name": c.name, "host_statuses": hosts})
        if q.get("format", [""])[0] == "json":
            stream.reply(200, json.dumps({"cluster_statuses": out}).encode(), content_type=JSON)
        else:
            stream.reply(200, ("\n".join(rows) + "\n").encode())

    def config_dump(self, stream: Stream, q: dict[str, list[str]]) -> None:
        body = {"configs": [{"@type": "meshctl.sidecar.Bootstrap", "bootstrap": _jsonable(self.sidecar.config)}]}
        stream.reply(200, json.dumps(body, indent=1).encode(), content_type=JSON)

    def ready(self, stream: Stream, q: dict[str, list[str]]) -> None:
        state = self.sidecar.state
        stream.reply(200 if state == "LIVE" else 503, f"{state}\n".encode())

    def server_info(self, stream: Stream, q: dict[str, list[str]]) -> None:
        up = int(time.monotonic() - self.sidecar.started)
        info = {"version": VERSION, "state": self.sidecar.state, "uptime_current_epoch": f"{up}s",
                "uptime_all_epochs": f"{up}s", "hot_restart_version": "disabled",
                "command_line_options": {"config_path": self.sidecar.source,
                                         "concurrency": getattr(self.sidecar, "concurrency", 1)},
                "node": {"id": os.environ.get("REPLICA_NAME", ""), "cluster": os.environ.get("POD_NAME", "")}}
        stream.reply(200, json.dumps(info, indent=1).encode(), content_type=JSON)

    def quit(self, stream: Stream, q: dict[str, list[str]]) -> None:
        stream.reply(200, b"OK\n")
        self.sidecar.request_stop()

    def hc_fail(self, stream: Stream, q: dict[str, list[str]]) -> None:
        self.sidecar.state = "DRAINING"
        stream.reply(200, b"OK\n")

    def runtime(self, stream: Stream, q: dict[str, list[str]]) -> None:
        stream.reply(200, self.sidecar.runtime.dump(), content_type=b"application/json")

    def runtime_modify(self, stream: Stream, q: dict[str, list[str]]) -> None:
        """Envoy's /runtime_modify, but only for keys the filters read (Envoy accepts any key)."""
        q = parse_qs(stream.url.decode("latin-1").partition("?")[2], keep_blank_values=True)
        if not q:
            stream.reply(400, b"usage: /runtime_modify?key1=value1&key2=value2&keyN=valueN\n"
                              b"use an empty value to remove a previously added override\n")
            return
        err = self.sidecar.runtime.modify({k: v[-1].strip() for k, v in q.items()})
        if err is not None:
            stream.reply(400, err.encode())
            return
        stream.reply(200, b"OK\n")

    def hc_ok(self, stream: Stream, q: dict[str, list[str]]) -> None:
        self.sidecar.state = "LIVE"
        stream.reply(200, b"OK\n")


def _sr(value: float) -> str:
    """A success rate as Envoy's /clusters prints it (-1: not computed)."""
    return "-1" if value < 0 else f"{value:g}"
