"""A trace's spans as a tree, and the one-line summary `meshctl trace` lists.

Pure functions over Zipkin v2 spans (dicts), so they serve the CLI and tests alike. The tree follows
``parentId``, with Zipkin's two subtleties:

* **shared spans**: with B3's shared span context (Envoy's default), a server reuses its client's span id
  and marks its half ``shared``; the two halves become client -> server, and the server's own children hang
  under the server half (the one of their service);
* **orphans**: a span whose parent never arrived (not sampled there, dropped, not reported yet) is a root
  of its own, so nothing reported is hidden.

Upstream attempts: a proxy reports one CLIENT span per attempt, siblings under the request's span; among
siblings of the same name and upstream, in start order, the second and later are retries. A tracer that
says so itself wins over the order (Envoy's ``retry.count`` on the second attempt on, or an attempt tag).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from meshctl.tracing.spans import Span, service_of

#: Tags that carry an attempt number (1 = the first try), as tracers name it.
ATTEMPT_TAGS = ("upstream.attempt", "retry.attempt", "attempt", "attempt_count", "x-envoy-attempt-count")
STATUS_TAGS = ("http.status_code", "http.response.status_code", "grpc.status_code")
FLAG_TAGS = ("response_flags",)
#: Where an attempt went (not ``peer.address``: on a proxy's server span that is the downstream).
UPSTREAM_TAGS = ("upstream_address", "upstream.address", "net.peer.name")


@dataclass
class Node:
    span: Span
    children: list[Node] = field(default_factory=list)
    #: The attempt number among its sibling attempts (1 = first), 0 when it is not one of several attempts.
    attempt: int = 0

    @property
    def retry(self) -> bool:
        return self.attempt > 1


def build(spans: list[Span]) -> list[Node]:
    """The trace's roots (normally one), each with its subtree; children in start order."""
    nodes = [Node(s) for s in spans]
    by_id: dict[str, list[Node]] = {}
    for node in nodes:
        by_id.setdefault(node.span["id"], []).append(node)
    parent_of: dict[int, Node] = {}
    for halves in by_id.values():
        primary = next((n for n in halves if not n.span.get("shared")), None)
        if primary is not None:
            for half in halves:
                if half is not primary:
                    parent_of[id(half)] = primary  # client -> its shared server half
    for node in nodes:
        if id(node) in parent_of:
            continue
        pid = node.span.get("parentId")
        if pid is None or pid == node.span["id"] or pid not in by_id:
            continue
        parent_of[id(node)] = _pick_parent(by_id[pid], node)
    roots = []
    for node in nodes:
        parent = parent_of.get(id(node))
        if parent is None:
            roots.append(node)
        else:
            parent.children.append(node)
    # Parent links that loop (a broken tracer) reach no root: show those spans as roots rather than lose them.
    reached: set[int] = set()

    def reach(start: Node) -> None:
        stack = [start]
        reached.add(id(start))
        while stack:
            node = stack.pop()
            node.children = [c for c in node.children if id(c) not in reached]  # cut the link that closes a loop
            for child in node.children:
                reached.add(id(child))
                stack.append(child)

    for root in roots:
        reach(root)
    for node in nodes:
        if id(node) not in reached:
            roots.append(node)
            reach(node)
    for node in nodes:
        node.children.sort(key=_start)
        _number_attempts(node.children)
    roots.sort(key=_start)
    return roots


def _pick_parent(candidates: list[Node], child: Node) -> Node:
    """Of a span id's halves, the one in the child's own service (it was created there), and of those the
    server half: a shared id's children are the server's work (both halves are in one service when a pod's
    sidecar calls its own service, which calls out through the same sidecar)."""
    if len(candidates) == 1:
        return candidates[0]
    service = service_of(child.span)
    pool = [n for n in candidates if service_of(n.span) == service] or candidates
    return next((n for n in pool if n.span.get("shared")), pool[0])


def _start(node: Node) -> tuple[int, str]:
    return node.span.get("timestamp", 0), node.span["id"]


def _number_attempts(siblings: list[Node]) -> None:
    groups: dict[tuple[str, str, str], list[Node]] = {}
    for node in siblings:
        s = node.span
        if s.get("kind") != "CLIENT":
            continue
        tags = s.get("tags", {})
        key = (service_of(s), s.get("name", ""), tags.get("upstream_cluster", "")
               or s.get("remoteEndpoint", {}).get("serviceName", ""))
        groups.setdefault(key, []).append(node)
    for group in groups.values():
        explicit = [_attempt_tag(n.span) for n in group]
        if len(group) == 1 and not (explicit[0] or 0) > 1:
            continue
        for i, node in enumerate(group):
            node.attempt = explicit[i] or i + 1


def _attempt_tag(span: Span) -> int | None:
    tags = span.get("tags", {})
    retries = tags.get("retry.count", "")  # Envoy's router: retries before this attempt, from the second on
    if retries.isdigit():
        return int(retries) + 1
    for key in ATTEMPT_TAGS:
        value = tags.get(key, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return None


def walk(roots: list[Node]) -> list[tuple[int, Node]]:
    """(depth, node) in display order."""
    out: list[tuple[int, Node]] = []
    stack = [(0, r) for r in reversed(roots)]
    while stack:
        depth, node = stack.pop()
        out.append((depth, node))
        stack.extend((depth + 1, c) for c in reversed(node.children))
    return out


# --------------------------------------------------------------------------- facts of one span


def status_code(span: Span) -> str | None:
    tags = span.get("tags", {})
    return next((tags[k] for k in STATUS_TAGS if tags.get(k)), None)


def response_flags(span: Span) -> str | None:
    flags = span.get("tags", {}).get("response_flags")
    return flags if flags and flags != "-" else None


def upstream(span: Span) -> str | None:
    tags = span.get("tags", {})
    found = next((tags[k] for k in UPSTREAM_TAGS if tags.get(k)), None)
    if found:
        return found
    remote = span.get("remoteEndpoint", {})
    ip = remote.get("ipv4") or remote.get("ipv6")
    if ip:
        return f"{ip}:{remote['port']}" if "port" in remote else ip
    return remote.get("serviceName")


def is_error(span: Span) -> bool:
    """Zipkin's rule (an ``error`` tag) or an HTTP 5xx."""
    if "error" in span.get("tags", {}):
        return True
    code = status_code(span)
    return bool(code and code.isdigit() and int(code) >= 500)


def path_of(span: Span) -> str | None:
    tags = span.get("tags", {})
    if tags.get("http.path"):
        return tags["http.path"]
    url = tags.get("http.url") or tags.get("url.full")
    if url:
        try:
            parts = urlsplit(url)
        except ValueError:
            return url
        return (parts.path or "/") + (f"?{parts.query}" if parts.query else "") if parts.netloc else url
    return None


# --------------------------------------------------------------------------- a trace


def summary(spans: list[Span]) -> dict[str, Any]:
    """What `meshctl trace` lists for one trace (``spans`` must not be empty)."""
    roots = build(spans)
    root = roots[0].span
    starts = [s["timestamp"] for s in spans if s.get("timestamp")]
    ends = [s["timestamp"] + s.get("duration", 0) for s in spans if s.get("timestamp")]
    method = root.get("tags", {}).get("http.method")
    path = path_of(root)
    return {
        "traceId": root["traceId"],
        "root": {"service": service_of(root), "name": root.get("name", ""),
                 "path": f"{method} {path}" if method and path else path, "status": status_code(root)},
        "start_us": min(starts) if starts else None,
        "duration_ms": round((max(ends) - min(starts)) / 1000, 3) if starts else None,
        "span_count": len(spans),
        "services": sorted({service_of(s) for s in spans if service_of(s)}),
        "errors": sum(1 for s in spans if is_error(s)),
        "retries": sum(1 for _, n in walk(roots) if n.retry),
        "roots": len(roots),
    }


def tree_json(roots: list[Node], origin_us: int | None) -> list[dict[str, Any]]:
    """The tree as JSON: each span's facts, its attempt number, its children."""
    def one(node: Node) -> dict[str, Any]:
        s = node.span
        ts = s.get("timestamp")
        return {"id": s["id"], "parentId": s.get("parentId"), "service": service_of(s), "name": s.get("name", ""),
                "kind": s.get("kind"), "offset_ms": round((ts - origin_us) / 1000, 3) if ts and origin_us else None,
                "duration_ms": round(s["duration"] / 1000, 3) if "duration" in s else None,
                "status": status_code(s), "response_flags": response_flags(s), "upstream": upstream(s),
                "error": is_error(s), "attempt": node.attempt or None, "retry": node.retry, "shared": bool(
                    s.get("shared")), "children": [one(c) for c in node.children]}

    return [one(r) for r in roots]
