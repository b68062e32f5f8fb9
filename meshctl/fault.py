"""``meshctl fault``: live fault injection through the sidecars' runtime (both engines).

Every sidecar runs with an inactive fault config on each route to a cluster (``sidecar.http_filters.
add_live_faults``), whose runtime keys are ``fault.http.<egress|ingress>.<cluster>.<kind>``; this module
sets them with ``POST /runtime_modify`` on each replica's admin socket and reads them back from
``GET /runtime``. Percentages are written in ten-thousandths (the configs' denominator), so 12.5 % works.
"""

from __future__ import annotations

import http.client
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from meshctl.client import request
from pods.durations import parse_duration

KINDS = ("abort.abort_percent", "abort.http_status", "delay.fixed_delay_percent", "delay.fixed_duration_ms")
_KEY = re.compile(r"^fault\.http\.(egress|ingress)\.(.+)\.(abort\.abort_percent|abort\.http_status|"
                  r"delay\.fixed_delay_percent|delay\.fixed_duration_ms)$")
ADMIN_CLUSTER = "admin_socket"  # the real Envoy's admin plumbing (sidecar.envoy_export)


class FaultError(Exception):
    """A usage problem (exit 2)."""


@dataclass(frozen=True)
class Fault:
    abort_percent: float | None = None  # 0-100
    status: int = 503
    delay_ms: int | None = None
    delay_percent: float = 100.0

    def runtime(self, prefix: str) -> dict[str, str]:
        """The runtime keys of one route (empty values remove an override)."""
        out = dict.fromkeys((prefix + k for k in KINDS), "")
        if self.abort_percent is not None:
            out[prefix + "abort.abort_percent"] = str(round(self.abort_percent * 100))
            out[prefix + "abort.http_status"] = str(self.status)
        if self.delay_ms is not None:
            out[prefix + "delay.fixed_delay_percent"] = str(round(self.delay_percent * 100))
            out[prefix + "delay.fixed_duration_ms"] = str(self.delay_ms)
        return out


def runtime_keys(spec: Fault, direction: str, cluster: str) -> dict[str, str]:
    return spec.runtime(f"fault.http.{direction}.{cluster}.")


def parse_percent(text: str, what: str) -> float:
    try:
        value = float(text.strip().rstrip("%"))
    except ValueError:
        raise FaultError(f"{what}: expected a percentage like 50%, got {text!r}") from None
    if not 0 <= value <= 100:
        raise FaultError(f"{what}: a percentage must be from 0 to 100, got {text!r}")
    return value


def parse_delay(text: str) -> tuple[int, float]:
    """``200ms@10%`` -> (200, 10.0); without ``@`` the delay applies to every request."""
    dur, _, pct = text.partition("@")
    d = dur.strip()
    if d.startswith("-"):
        raise FaultError(f"--delay: a delay cannot be negative, got {dur!r}")
    try:
        seconds = parse_duration(d)
    except (ValueError, TypeError):
        seconds = None
    if seconds is None:
        raise FaultError(f"--delay: expected DURATION[@PERCENT] like 200ms@10%, got {text!r}")
    if seconds < 0:
        raise FaultError(f"--delay: a delay cannot be negative, got {dur!r}")
    return int(round(seconds * 1000)), parse_percent(pct, "--delay") if pct else 100.0


def sidecar_replicas(status: dict[str, Any], pod: str) -> list[tuple[str, str]]:
    for p in status["pods"]:
        if p["pod"] == pod:
            if p.get("sidecar") is None:
                raise FaultError(f"pod '{pod}' has no sidecar: faults are injected by a sidecar")
            return [(r["replica"], r["admin_socket"]) for r in p["replicas"] if r.get("admin_socket")]
    raise FaultError(f"no pod named '{pod}'")


def _admin(sock: str, method: str, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    return request(Path(sock), method, path, timeout=timeout)


def egress_clusters(status: dict[str, Any], src: str, dst: str) -> list[str]:
    """FROM's egress clusters that reach TO: named TO, TO_<port> or <anything>_TO (the seed's remote_service_b)."""
    pod = next(p for p in status["pods"] if p["pod"] == src)
    clusters = list((pod.get("sidecar") or {}).get("egress_clusters") or [])
    hit = [c for c in clusters if c == dst or c.startswith(dst + "_") or c.endswith("_" + dst)]
    if not hit:
        raise FaultError(f"pod '{src}' has no egress route to '{dst}' (its egress clusters: "
                         f"{', '.join(clusters) or 'none'})")
    return hit


def ingress_clusters(status: dict[str, Any], pod: str, sock: str) -> list[str]:
    """The pod's clusters that are not egress ones, from GET /clusters (the same text on both engines)."""
    p = next(p for p in status["pods"] if p["pod"] == pod)
    egress = set((p.get("sidecar") or {}).get("egress_clusters") or [])
    code, body = _admin(sock, "GET", "/clusters")
    names = dict.fromkeys(line.split("::", 1)[0] for line in body.decode("utf-8", "replace").splitlines()
                          if "::" in line)
    out = [n for n in names if n not in egress and n != ADMIN_CLUSTER]
    if code != 200 or not out:
        raise FaultError(f"pod '{pod}' has no ingress route to a cluster")
    return out


def apply(sockets: list[tuple[str, str]], keys: dict[str, str]) -> list[str]:
    """Set ``keys`` on every replica; the problems (one line each)."""
    problems = []
    for replica, sock in sockets:
        try:
            code, body = _admin(sock, "POST", "/runtime_modify?" + urlencode(keys))
        except (OSError, http.client.HTTPException) as exc:
            problems.append(f"{replica}: cannot reach its sidecar admin at {sock}: {exc}")
            continue
        if code != 200:
            problems.append(f"{replica}: HTTP {code}: {body.decode('utf-8', 'replace').strip()}")
    return problems


def runtime_of(sock: str, timeout: float = 5.0) -> dict[str, str]:
    code, body = _admin(sock, "GET", "/runtime", timeout)
    if code != 200:
        return {}
    entries = json.loads(body or b"{}").get("entries", {})
    return {k: str(v.get("final_value", "")) for k, v in entries.items()}


def active(status: dict[str, Any], timeout: float = 5.0) -> list[dict[str, Any]]:
    """Every active fault: {pod, direction, cluster, abort_percent, status, delay_ms, delay_percent, replicas}."""
    rows: dict[tuple[str, str, str], dict[str, Any]] = {}
    for p in status["pods"]:
        if p.get("sidecar") is None:
            continue
        for r in p["replicas"]:
            if not r.get("admin_socket"):
                continue
            try:
                values = runtime_of(r["admin_socket"], timeout)
            except (OSError, http.client.HTTPException, ValueError):
                continue
            found: dict[tuple[str, str], dict[str, str]] = {}
            for k, v in values.items():
                m = _KEY.match(k)
                if m and v != "":
                    found.setdefault((m.group(1), m.group(2)), {})[m.group(3)] = v
            for (direction, cluster), kv in found.items():
                abort = _num(kv.get("abort.abort_percent"))
                delay = _num(kv.get("delay.fixed_delay_percent"))
                if not abort and not delay:
                    continue
                row = rows.setdefault((p["pod"], direction, cluster), {
                    "pod": p["pod"], "direction": direction, "cluster": cluster,
                    "abort_percent": abort / 100 if abort else None,
                    "status": int(_num(kv.get("abort.http_status")) or 503) if abort else None,
                    "delay_ms": int(_num(kv.get("delay.fixed_duration_ms"))) if delay else None,
                    "delay_percent": delay / 100 if delay else None, "replicas": []})
                row["replicas"].append(r["replica"])
    return list(rows.values())


def _num(v: str | None) -> float:
    try:
        return float(v) if v else 0.0
    except ValueError:
        return 0.0


def clear_keys(values: dict[str, str], direction: str | None = None, cluster: str | None = None) -> dict[str, str]:
    out = {}
    for k in values:
        m = _KEY.match(k)
        if m and (direction is None or (m.group(1) == direction and m.group(2) == cluster)):
            out[k] = ""
    return out


def describe(row: dict[str, Any]) -> str:
    parts = []
    if row["abort_percent"] is not None:
        parts.append(f"abort {row['abort_percent']:g}% ({row['status']})")
    if row["delay_ms"] is not None:
        parts.append(f"delay {row['delay_ms']}ms@{row['delay_percent']:g}%")
    return ", ".join(parts)
