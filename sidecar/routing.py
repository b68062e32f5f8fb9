"""Route selection: virtual host by authority, then the first matching route, as Envoy does.

Domains are matched in Envoy's order: exact names, then suffix wildcards
(``*.example.com``, longest first), then prefix wildcards (``example.*``,
``b.local.service:*``, longest first), then ``*``. Host and domains compare
case-insensitively; the port is part of the host, which is why the seed lists
both ``b.local.service`` and ``b.local.service:*``.
"""

from __future__ import annotations

from sidecar.config import HeaderMatch, Route, RouteConfig, RouteMatch, VirtualHost
from sidecar.http1 import Headers


class RouteTable:
    def __init__(self, config: RouteConfig) -> None:
        self.config = config
        self.exact: dict[str, VirtualHost] = {}
        suffix: list[tuple[str, VirtualHost]] = []
        prefix: list[tuple[str, VirtualHost]] = []
        self.catch_all: VirtualHost | None = None
        for vh in config.virtual_hosts:
            for domain in vh.domains:
                d = domain.lower()
                if d == "*":
                    self.catch_all = self.catch_all or vh
                elif d.startswith("*"):
                    suffix.append((d[1:], vh))
                elif d.endswith("*"):
                    prefix.append((d[:-1], vh))
                else:
                    self.exact.setdefault(d, vh)
        self.suffix = sorted(suffix, key=lambda x: -len(x[0]))
        self.prefix = sorted(prefix, key=lambda x: -len(x[0]))
        self._cache: dict[str, VirtualHost | None] = {}

    def virtual_host(self, authority: str) -> VirtualHost | None:
        cached = self._cache.get(authority, _MISS)
        if cached is not _MISS:
            return cached  # type: ignore[return-value]
        host = authority.lower()
        vh = self.exact.get(host)
        if vh is None:
            vh = next((v for s, v in self.suffix if host.endswith(s) and len(host) > len(s)), None)
        if vh is None:
            vh = next((v for p, v in self.prefix if host.startswith(p) and len(host) > len(p)), None)
        if vh is None:
            vh = self.catch_all
        if len(self._cache) < 4096:  # hosts come from clients: bound the cache
            self._cache[authority] = vh
        return vh

    @staticmethod
    def route(vh: VirtualHost, path: str, headers: Headers) -> Route | None:
        bare = path.split("?", 1)[0]
        for route in vh.routes:
            if _path_matches(route.match, path, bare) and _headers_match(route.match.headers, headers):
                return route
        return None


_MISS = object()


def _path_matches(m: RouteMatch, path: str, bare: str) -> bool:
    if m.prefix is not None:
        return bare.startswith(m.prefix) if m.case_sensitive else bare.lower().startswith(m.prefix.lower())
    if m.path is not None:
        return bare == m.path if m.case_sensitive else bare.lower() == m.path.lower()
    if m.regex is not None:
        return m.regex.fullmatch(bare) is not None
    return True


def _headers_match(wanted: tuple[HeaderMatch, ...], headers: Headers) -> bool:
    if not wanted:
        return True
    for hm in wanted:
        name = hm.name.encode()
        values = [v.decode("latin-1") for n, v in headers if n == name]
        value = ",".join(values) if values else None
        if hm.present is not None:
            ok = (value is not None) == hm.present
        elif value is None:
            return False  # Envoy: a missing header fails a value matcher, inverted or not
        elif hm.exact is not None:
            ok = value == hm.exact
        elif hm.prefix is not None:
            ok = value.startswith(hm.prefix)
        elif hm.suffix is not None:
            ok = value.endswith(hm.suffix)
        elif hm.regex is not None:
            ok = hm.regex.fullmatch(value) is not None
        else:
            ok = True
        if ok == hm.invert:
            return False
    return True
