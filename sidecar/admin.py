"""The admin interface, with Envoy's paths and formats.

Served by the same HTTP/1 protocol as the data path (no web framework: the
sidecar's memory budget is 25 MB). Bound to the pod alias unless the
topology opts in to a public address.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from sidecar.server import Stream

if TYPE_CHECKING:
    from sidecar.app import Sidecar

VERSION = "meshctl-sidecar/0.1.0 (Envoy-compatible admin subset)"
JSON = b"application/json"


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [_jsonable(x) for x in obj]
    if isinstance(obj, frozenset | set):
        return sorted(_jsonable(x) for x in obj)
    if isinstance(obj, re.Pattern):
        return obj.pattern
    if isinstance(obj, bytes):
        return obj.decode("utf-8", "replace")
    return obj


class Admin:
    def __init__(self, sidecar: Sidecar) -> None:
        self.sidecar = sidecar
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
        }

    def handle(self, stream: Stream) -> None:
        path, _, query = stream.url.decode("latin-1").partition("?")
        entry = self.routes.get(path)
        if entry is None:
            stream.reply(404, b"invalid path. admin commands are:\n" + self._help())
            return
        method, fn, _ = entry
        if method == "POST" and stream.method != b"POST":
            stream.reply(405, b"This endpoint requires POST\n")
            return
        fn(stream, parse_qs(query))

    def _help(self) -> bytes:
        return "".join(f"  {p}: {d}\n" for p, (_, _, d) in self.routes.items()).encode()

    def index(self, stream: Stream, q: dict[str, list[str]]) -> None:
        stream.reply(200, b"admin commands are:\n" + self._help())

    def stats(self, stream: Stream, q: dict[str, list[str]]) -> None:
        fmt = q.get("format", ["text"])[0]
        filt = q.get("filter", [None])[0]
        store = self.sidecar.store
        self.sidecar.refresh_server_stats()
        try:
            if filt:
                re.compile(filt)
        except re.error as exc:
            stream.reply(400, f"invalid regex: {exc}\n".encode())
            return
        if fmt == "json":
            stream.reply(200, json.dumps(store.render_json(filt)).encode(), content_type=JSON)
        elif fmt == "prometheus":
            self.prometheus(stream, q)
        else:
            stream.reply(200, store.render_text(filt, used_only="usedonly" in q).encode())

    def prometheus(self, stream: Stream, q: dict[str, list[str]]) -> None:
        self.sidecar.refresh_server_stats()
        stream.reply(200, self.sidecar.store.render_prometheus().encode(),
                     content_type=b"text/plain; version=0.0.4; charset=utf-8")

    def clusters(self, stream: Stream, q: dict[str, list[str]]) -> None:
        rows = []
        out: list[dict[str, Any]] = []
        for c in self.sidecar.clusters.values():
            rows.append(f"{c.name}::default_priority::max_connections::{c.breakers.max_connections}")
            rows.append(f"{c.name}::default_priority::max_requests::{c.breakers.max_requests}")
            rows.append(f"{c.name}::default_priority::max_retries::{c.breakers.max_retries}")
            rows.append(f"{c.name}::added_via_api::false")
            hosts = []
            for p in c.pools:
                a = p.address
                rows += [f"{c.name}::{a}::cx_active::{len(p.idle)}", f"{c.name}::{a}::rq_active::{p.active_requests}",
                         f"{c.name}::{a}::health_flags::healthy", f"{c.name}::{a}::weight::1"]
                hosts.append({"address": {"socket_address": {"address": p.host, "port_value": p.port}},
                              "stats": [{"name": "rq_active", "value": p.active_requests}],
                              "health_status": {"eds_health_status": "HEALTHY"}, "weight": 1})
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
                "command_line_options": {"config_path": self.sidecar.source, "concurrency": 1},
                "node": {"id": os.environ.get("REPLICA_NAME", ""), "cluster": os.environ.get("POD_NAME", "")}}
        stream.reply(200, json.dumps(info, indent=1).encode(), content_type=JSON)

    def quit(self, stream: Stream, q: dict[str, list[str]]) -> None:
        stream.reply(200, b"OK\n")
        self.sidecar.request_stop()

    def hc_fail(self, stream: Stream, q: dict[str, list[str]]) -> None:
        self.sidecar.state = "DRAINING"
        stream.reply(200, b"OK\n")

    def hc_ok(self, stream: Stream, q: dict[str, list[str]]) -> None:
        self.sidecar.state = "LIVE"
        stream.reply(200, b"OK\n")
