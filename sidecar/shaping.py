"""Traffic shaping on a route, as Envoy's router does it: weighted clusters, header mutations, rewrites, mirrors.

A ``RoutePlan`` is built once per route that uses any of these (or whose virtual host or route configuration
mutates headers); routes without one cost the router a single falsy check per request.

Header mutations follow Envoy's ``HeaderParser``: each level (route, then virtual host, then route
configuration, so the most global one is evaluated last and wins an overwrite, Envoy's default
``most_specific_header_mutations_wins: false``) first removes its ``*_headers_to_remove``, then applies its
``*_headers_to_add`` with their ``append_action``; an empty value is skipped unless ``keep_empty_value``.
"""

from __future__ import annotations

import bisect
import random

from sidecar.config import HeaderValueOption, MirrorPolicy, Route, RouteConfig, VirtualHost
from sidecar.http1 import Headers

#: One level's compiled mutation: (names to remove, [(name, value, action)]).
_Level = tuple[frozenset[bytes], tuple[tuple[bytes, bytes, str], ...]]


def _compile(removes: tuple[str, ...], adds: tuple[HeaderValueOption, ...]) -> _Level | None:
    ops = tuple((h.name.encode("latin-1"), h.value.encode("latin-1"), h.append_action)
                for h in adds if h.value or h.keep_empty_value)
    if not removes and not ops:
        return None
    return frozenset(n.encode("latin-1") for n in removes), ops


def apply_levels(headers: Headers, levels: tuple[_Level, ...]) -> Headers:
    """Envoy's evaluateHeaders for each level in order; returns the (possibly new) list."""
    for removes, ops in levels:
        if removes:
            headers = [h for h in headers if h[0] not in removes]
        for name, value, action in ops:
            if action == "APPEND_IF_EXISTS_OR_ADD":
                headers.append((name, value))
                continue
            present = any(h[0] == name for h in headers)
            if action == "ADD_IF_ABSENT":
                if not present:
                    headers.append((name, value))
            elif present or action == "OVERWRITE_IF_EXISTS_OR_ADD":
                headers = [h for h in headers if h[0] != name]
                headers.append((name, value))
    return headers


class RoutePlan:
    """What the router does beyond forwarding to one cluster, for one route."""

    __slots__ = ("names", "cumulative", "total", "request_levels", "response_levels", "mirrors",
                 "regex_rewrite", "host_rewrite")

    def __init__(self, route: Route, vh: VirtualHost, rc: RouteConfig) -> None:
        self.names: tuple[str, ...] = ()
        self.cumulative: list[int] = []
        self.total = 0
        acc = 0
        for w in route.weighted_clusters:
            if w.weight <= 0:
                continue
            acc += w.weight
            self.names += (w.name,)
            self.cumulative.append(acc)
        self.total = acc
        levels = (route.headers, vh.headers, rc.headers)
        self.request_levels = tuple(lv for lv in (_compile(m.request_remove, m.request_add) for m in levels) if lv)
        self.response_levels = tuple(lv for lv in (_compile(m.response_remove, m.response_add) for m in levels)
                                     if lv)
        self.mirrors: tuple[MirrorPolicy, ...] = route.mirror_policies
        self.regex_rewrite = route.regex_rewrite
        self.host_rewrite = route.host_rewrite_literal.encode("latin-1") if route.host_rewrite_literal else None

    def pick_cluster(self) -> str:
        """Envoy's selection: a random value modulo the weights' sum, then the first cumulative bound above it."""
        return self.names[bisect.bisect_right(self.cumulative, random.randrange(self.total))]

    @staticmethod
    def needed(route: Route, vh: VirtualHost, rc: RouteConfig) -> bool:
        return bool(route.weighted_clusters or route.mirror_policies or route.regex_rewrite is not None
                    or route.host_rewrite_literal is not None or route.headers or vh.headers or rc.headers)


def plans_for(rc: RouteConfig) -> dict[int, RoutePlan]:
    """id(route) -> its plan, for the routes that need one."""
    return {id(r): RoutePlan(r, vh, rc) for vh in rc.virtual_hosts for r in vh.routes
            if RoutePlan.needed(r, vh, rc)}


def mirror_sampled(m: MirrorPolicy) -> bool:
    if m.numerator >= m.denominator:
        return True
    return m.numerator > 0 and random.randrange(m.denominator) < m.numerator


def shadow_host(host: bytes) -> bytes:
    """Envoy's shadow authority: ``-shadow`` appended to the host, before a port."""
    name, sep, port = host.rpartition(b":")
    if sep and port.isdigit():
        return name + b"-shadow:" + port
    return host + b"-shadow"
