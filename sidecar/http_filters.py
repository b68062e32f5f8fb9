"""HTTP filters before the router: Envoy's fault injection and local rate limit, and the runtime they read.

Configuration (both front ends) is parsed here into ``sidecar.config`` objects; at run time an
``HttpFilterChain`` per connection manager runs the filters between route selection and the router, as
Envoy's filter chain does (a fault abort answers even a request no route matches). With no filters
configured the chain does not exist and the request path pays nothing; with only fault filters, the routes
no fault can touch (0 %, no header control, none of their runtime keys set: the live faults while off) are
computed at load and on every runtime change, and their requests go to the router after one set lookup.

A delay is one ``loop.call_later`` per delayed request (no task); the rate limit's token bucket is
refilled lazily on each request from the elapsed time (no timer), continuously like Envoy 1.40's.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from random import random
from typing import TYPE_CHECKING, Any

from sidecar.config import (
    Bootstrap,
    FaultAbort,
    FaultDelay,
    FaultFilter,
    HeaderMatch,
    HttpFilter,
    Listener,
    LocalRateLimit,
    Route,
    RuntimePercent,
    VirtualHost,
)
from sidecar.config_fields import Ctx, as_dict, as_int, as_list, as_str, check_keys, duration, sub

if TYPE_CHECKING:
    from sidecar.http1 import Headers
    from sidecar.server import Stream
    from sidecar.stats import Store

FAULT = "envoy.filters.http.fault"
LOCAL_RATELIMIT = "envoy.filters.http.local_ratelimit"
# The same names as sidecar.rbac.RBAC and sidecar.jwt_authn.JWT_AUTHN: those modules are imported only where a
# configuration has such a filter (a sidecar without them starts ~5 ms sooner), their names are needed always.
RBAC = "envoy.filters.http.rbac"
JWT_AUTHN = "envoy.filters.http.jwt_authn"
FAULT_TYPE = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"
LOCAL_RATELIMIT_TYPE = "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit"
FILTER_NAMES = (FAULT, LOCAL_RATELIMIT, RBAC, JWT_AUTHN)
_monotonic = time.monotonic
DENOMINATORS = {"HUNDRED": 100, "TEN_THOUSAND": 10000, "MILLION": 1000000}
DENOMINATOR_NAMES = {v: k for k, v in DENOMINATORS.items()}
FLAG_FAULT_ABORT = "FI"
FLAG_FAULT_DELAY = "DI"
FLAG_RATE_LIMITED = "RL"
#: Runtime keys anyone may set (besides the runtime keys named in the configured filters).
RUNTIME_PREFIXES = ("fault.http.",)


def _loaded(module: str, name: str) -> type | None:
    """A class of an optional filter's module (RBAC, JWT), or None while that module is not imported: then no
    configuration holds an instance of it."""
    mod = sys.modules.get(module)
    return getattr(mod, name, None) if mod is not None else None


# --- parsing (Envoy YAML; the short form builds the same objects) -------------------------------------------------

def fractional_percent(ctx: Ctx, value: Any, path: str) -> tuple[int, int]:
    """A FractionalPercent ({numerator, denominator}); the short form may write a plain number (percent)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not 0 <= value <= 100:
            raise ctx.error(path, f"a percentage must be from 0 to 100, got {value}")
        return int(round(value * 10000)), 1000000
    obj = as_dict(ctx, value, path, allow_none=False)
    check_keys(ctx, obj, path, ("numerator", "denominator"))
    den_name = str(obj.get("denominator", "HUNDRED")).upper()
    if den_name not in DENOMINATORS:
        raise ctx.error(sub(path, "denominator"), f"must be one of {', '.join(DENOMINATORS)}, got {den_name!r}")
    den = DENOMINATORS[den_name]
    num = as_int(ctx, obj.get("numerator", 0), sub(path, "numerator"), 0)
    return min(num, den), den  # Envoy: a numerator above the denominator means 100 %


def _typed(ctx: Ctx, f: dict[str, Any], path: str) -> tuple[dict[str, Any], str]:
    key = "typed_config" if "typed_config" in f else "config"
    cfg = as_dict(ctx, f.get(key), sub(path, key))
    return {k: v for k, v in cfg.items() if k != "@type"}, sub(path, key)


def parse_fault(ctx: Ctx, cfg: dict[str, Any], path: str,
                header: Callable[[Ctx, Any, str], HeaderMatch] | None = None) -> FaultFilter:
    check_keys(ctx, cfg, path, ("abort", "delay", "max_active_faults", "upstream_cluster", "headers",
                                "abort_percent_runtime", "abort_http_status_runtime", "delay_percent_runtime",
                                "delay_duration_runtime"),
               errors={"response_rate_limit": "response_rate_limit is not supported",
                       "downstream_nodes": "downstream_nodes is not supported"})
    kw: dict[str, Any] = {}
    if cfg.get("abort") is not None:
        ap = sub(path, "abort")
        a = as_dict(ctx, cfg["abort"], ap, allow_none=False)
        check_keys(ctx, a, ap, ("http_status", "header_abort", "percentage"),
                   errors={"grpc_status": "grpc_status is not supported (HTTP/1.1 only)"})
        status = None
        if "http_status" in a:
            status = as_int(ctx, a["http_status"], sub(ap, "http_status"), 200, 599)
        if (status is None) == ("header_abort" not in a):
            raise ctx.error(ap, "exactly one of http_status and header_abort is required")
        pct = fractional_percent(ctx, a["percentage"], sub(ap, "percentage")) if "percentage" in a else (0, 100)
        kw["abort"] = FaultAbort(http_status=status, header_abort="header_abort" in a, percentage=pct)
    if cfg.get("delay") is not None:
        dp = sub(path, "delay")
        d = as_dict(ctx, cfg["delay"], dp, allow_none=False)
        check_keys(ctx, d, dp, ("fixed_delay", "header_delay", "percentage"))
        fixed = None
        if "fixed_delay" in d:
            fixed = duration(ctx, d["fixed_delay"], sub(dp, "fixed_delay"))
            if fixed <= 0:
                raise ctx.error(sub(dp, "fixed_delay"), "must be greater than 0")
        if (fixed is None) == ("header_delay" not in d):
            raise ctx.error(dp, "exactly one of fixed_delay and header_delay is required")
        pct = fractional_percent(ctx, d["percentage"], sub(dp, "percentage")) if "percentage" in d else (0, 100)
        kw["delay"] = FaultDelay(fixed_delay_s=fixed, header_delay="header_delay" in d, percentage=pct)
    if cfg.get("max_active_faults") is not None:
        kw["max_active_faults"] = as_int(ctx, _unwrap(cfg["max_active_faults"]), sub(path, "max_active_faults"))
    if cfg.get("upstream_cluster") is not None:
        kw["upstream_cluster"] = as_str(ctx, cfg["upstream_cluster"], sub(path, "upstream_cluster"))
    if cfg.get("headers") is not None:
        if header is None:
            raise ctx.error(sub(path, "headers"), "not supported here")
        hp = sub(path, "headers")
        kw["headers"] = tuple(header(ctx, h, sub(hp, i)) for i, h in enumerate(as_list(ctx, cfg["headers"], hp)))
    for key in ("abort_percent_runtime", "abort_http_status_runtime", "delay_percent_runtime",
                "delay_duration_runtime"):
        if cfg.get(key) is not None:
            kw[key] = as_str(ctx, cfg[key], sub(path, key))
    return FaultFilter(**kw)


def _unwrap(value: Any) -> Any:
    return value.get("value") if isinstance(value, dict) else value


def _runtime_percent(ctx: Ctx, value: Any, path: str) -> RuntimePercent:
    obj = as_dict(ctx, value, path, allow_none=False)
    check_keys(ctx, obj, path, ("runtime_key", "default_value"))
    if "runtime_key" not in obj:
        raise ctx.error(sub(path, "runtime_key"), "required")
    pct = fractional_percent(ctx, obj["default_value"], sub(path, "default_value")) \
        if "default_value" in obj else (0, 100)
    return RuntimePercent(as_str(ctx, obj["runtime_key"], sub(path, "runtime_key")), pct)


def parse_local_ratelimit(ctx: Ctx, cfg: dict[str, Any], path: str) -> LocalRateLimit:
    check_keys(ctx, cfg, path, ("stat_prefix", "token_bucket", "filter_enabled", "filter_enforced", "status"),
               errors={k: f"{k} is not supported" for k in ("descriptors", "rate_limits",
                                                           "local_rate_limit_per_downstream_connection")})
    if "stat_prefix" not in cfg:
        raise ctx.error(sub(path, "stat_prefix"), "required")
    tp = sub(path, "token_bucket")
    if cfg.get("token_bucket") is None:
        raise ctx.error(tp, "required (per-route token buckets are not supported)")
    tb = as_dict(ctx, cfg["token_bucket"], tp, allow_none=False)
    check_keys(ctx, tb, tp, ("max_tokens", "tokens_per_fill", "fill_interval"))
    if "max_tokens" not in tb or "fill_interval" not in tb:
        raise ctx.error(tp, "max_tokens and fill_interval are required")
    fill = duration(ctx, tb["fill_interval"], sub(tp, "fill_interval"))
    if fill <= 0:
        raise ctx.error(sub(tp, "fill_interval"), "must be greater than 0")
    kw: dict[str, Any] = {}
    for key in ("filter_enabled", "filter_enforced"):
        if cfg.get(key) is not None:
            kw[key] = _runtime_percent(ctx, cfg[key], sub(path, key))
    if cfg.get("status") is not None:
        st = as_dict(ctx, cfg["status"], sub(path, "status"), allow_none=False)
        kw["status"] = as_int(ctx, st.get("code"), sub(sub(path, "status"), "code"), 200, 599)
    return LocalRateLimit(stat_prefix=as_str(ctx, cfg["stat_prefix"], sub(path, "stat_prefix")),
                          max_tokens=as_int(ctx, tb["max_tokens"], sub(tp, "max_tokens"), 1),
                          tokens_per_fill=as_int(ctx, _unwrap(tb.get("tokens_per_fill", 1)),
                                                 sub(tp, "tokens_per_fill"), 1),
                          fill_interval_s=fill, **kw)


def parse_http_filter(ctx: Ctx, f: dict[str, Any], path: str,
                      header: Callable[[Ctx, Any, str], HeaderMatch] | None = None) -> HttpFilter:
    name = f.get("name")
    cfg, cpath = _typed(ctx, f, path)
    if name == FAULT:
        return HttpFilter(FAULT, parse_fault(ctx, cfg, cpath, header))
    if name == RBAC:
        from sidecar.rbac import parse_rbac

        return HttpFilter(RBAC, parse_rbac(ctx, cfg, cpath, header))
    if name == JWT_AUTHN:
        from sidecar.jwt_authn import parse_jwt_authn

        return HttpFilter(JWT_AUTHN, parse_jwt_authn(ctx, cfg, cpath, header))
    return HttpFilter(LOCAL_RATELIMIT, parse_local_ratelimit(ctx, cfg, cpath))


def parse_per_filter(ctx: Ctx, value: Any, path: str,
                     header: Callable[[Ctx, Any, str], HeaderMatch] | None = None) -> FaultFilter | None:
    """A route's ``typed_per_filter_config``: the fault filter's override (others are errors)."""
    obj = as_dict(ctx, value, path)
    out = None
    for name, cfg in obj.items():
        p = sub(path, name)
        if name != FAULT:
            raise ctx.error(p, f"per-route config for {name!r} is not supported (only {FAULT})")
        c = {k: v for k, v in as_dict(ctx, cfg, p, allow_none=False).items() if k != "@type"}
        out = parse_fault(ctx, c, p, header)
    return out


# --- live faults: the inactive per-route fault configs that `meshctl fault` switches on -------------------------

def live_fault_prefix(listener: Listener, cluster: str) -> str:
    """The runtime key prefix of one listener's routes to one cluster: ``fault.http.egress.b.``."""
    return f"fault.http.{'egress' if listener.is_egress else 'ingress'}.{cluster}."


def live_fault(prefix: str) -> FaultFilter:
    """A fault config that does nothing until its runtime keys say so (percentages in ten-thousandths)."""
    return FaultFilter(abort=FaultAbort(http_status=503, percentage=(0, 10000)),
                       delay=FaultDelay(fixed_delay_s=0.001, percentage=(0, 10000)),
                       abort_percent_runtime=prefix + "abort.abort_percent",
                       abort_http_status_runtime=prefix + "abort.http_status",
                       delay_percent_runtime=prefix + "delay.fixed_delay_percent",
                       delay_duration_runtime=prefix + "delay.fixed_duration_ms")


def add_live_faults(boot: Bootstrap) -> Bootstrap:
    """Every listener gets a fault filter (first) and every route to a cluster its own inactive override."""
    listeners = []
    for lst in boot.listeners:
        hcm = lst.hcm
        vhosts = []
        for vh in hcm.route_config.virtual_hosts:
            routes = []
            for r in vh.routes:
                if r.cluster and r.fault is None:
                    r = replace(r, fault=live_fault(live_fault_prefix(lst, r.cluster)))
                elif r.weighted_clusters and r.fault is None:  # each cluster of a split its own (Envoy: the
                    r = replace(r, weighted_clusters=tuple(  # weighted cluster's per-filter config wins)
                        w if w.fault is not None else replace(w, fault=live_fault(live_fault_prefix(lst, w.name)))
                        for w in r.weighted_clusters))
                routes.append(r)
            vhosts.append(replace(vh, routes=tuple(routes)))
        filters = hcm.http_filters
        if not any(f.name == FAULT for f in filters):
            filters = (HttpFilter(FAULT, FaultFilter()), *filters)
        rc = replace(hcm.route_config, virtual_hosts=tuple(vhosts))
        listeners.append(replace(lst, hcm=replace(hcm, route_config=rc, http_filters=filters)))
    return replace(boot, listeners=tuple(listeners))


# --- runtime ----------------------------------------------------------------------------------------------------

class Runtime:
    """Envoy's layered runtime, reduced to what we read: a static (empty) layer and the admin layer."""

    def __init__(self) -> None:
        self.values: dict[str, str] = {}
        self.known: set[str] = set()  # runtime keys named in the configured filters
        #: Called after every change: the filter chains recompute what can fire (see HttpFilterChain.rearm).
        self.watchers: list[Callable[[], None]] = []

    def valid(self, key: str) -> bool:
        return key in self.known or key.startswith(RUNTIME_PREFIXES)

    def help(self) -> str:
        return ", ".join([p + "*" for p in RUNTIME_PREFIXES] + sorted(k for k in self.known
                                                                     if not k.startswith(RUNTIME_PREFIXES)))

    def modify(self, changes: dict[str, str]) -> str | None:
        """Apply ``key=value`` pairs (an empty value removes the override); an error message or None."""
        bad = [k for k in changes if not self.valid(k)]
        if bad:
            return (f"unknown runtime key{'s' if len(bad) > 1 else ''} {', '.join(map(repr, bad))}; "
                    f"valid keys: {self.help()}\n")
        for k, v in changes.items():
            if v == "":
                self.values.pop(k, None)
            else:
                self.values[k] = v
        for watch in self.watchers:
            watch()
        return None

    def dump(self) -> bytes:
        entries = {k: {"final_value": v, "layer_values": ["", v]} for k, v in sorted(self.values.items())}
        return json.dumps({"layers": ["static", "admin"], "entries": entries}, indent=1).encode()

    def get_int(self, key: str, default: int) -> int:
        v = self.values.get(key)
        if v is None:
            return default
        try:
            return int(v)
        except ValueError:
            return default

    def enabled(self, key: str, pct: tuple[int, int]) -> bool:
        """Envoy's featureEnabled(key, FractionalPercent): an integer runtime value replaces the numerator."""
        num, den = pct
        v = self.values.get(key)
        if v is not None:
            try:
                num = int(v)
            except ValueError:
                pass
        if num <= 0:
            return False
        return num >= den or random() * den < num


# --- the filters at run time ------------------------------------------------------------------------------------

def _header_int(stream: Stream, name: bytes) -> int | None:
    v = stream.seen.get(name)
    if v is None:
        return None
    v = v.strip()
    return int(v) if v.isdigit() else None


class FaultStats:
    __slots__ = ("aborts_injected", "delays_injected", "faults_overflow", "active_faults", "response_rl_injected")

    def __init__(self, store: Store, prefix: str) -> None:
        for n in ("aborts_injected", "delays_injected", "faults_overflow", "response_rl_injected"):
            setattr(self, n, store.counter(prefix + n))
        self.active_faults = store.gauge(prefix + "active_faults")


class FaultRuntime:
    name = FAULT

    def __init__(self, cfg: FaultFilter, runtime: Runtime, stats: FaultStats) -> None:
        self.cfg = cfg
        self.runtime = runtime
        self.stats = stats

    def decode(self, chain: HttpFilterChain, req: Request) -> bool:
        """True: go on to the next filter now; False: this filter finishes or resumes the request."""
        route = req.route
        cfg = _effective(route, req.stream.info.upstream_cluster, self.cfg)
        if cfg.abort is None and cfg.delay is None:
            return True
        if cfg.upstream_cluster is not None and (route is None or
                                                 req.stream.info.upstream_cluster != cfg.upstream_cluster):
            return True
        if cfg.headers and not chain.headers_match(cfg.headers, req.headers):
            return True
        stats = self.stats
        if cfg.max_active_faults is not None and stats.active_faults.value >= cfg.max_active_faults:
            stats.faults_overflow.value += 1
            return True
        stream = req.stream
        rt = self.runtime
        d = cfg.delay
        if d is not None:
            pct = d.percentage
            if d.header_delay:
                hp = _header_int(stream, b"x-envoy-fault-delay-request-percentage")
                if hp is not None:
                    pct = (min(hp, pct[0]), pct[1])
            if rt.enabled(cfg.delay_percent_runtime, pct):
                if d.header_delay:
                    ms = _header_int(stream, b"x-envoy-fault-delay-request")
                else:
                    ms = int(round((d.fixed_delay_s or 0) * 1000))
                if ms is not None:
                    ms = rt.get_int(cfg.delay_duration_runtime, ms)
                if ms is not None and ms > 0:
                    stats.delays_injected.value += 1
                    stats.active_faults.value += 1
                    stream.info.response_flags.append(FLAG_FAULT_DELAY)
                    DelayedRequest(chain, req, self, cfg, ms / 1000)
                    return False
        return self._maybe_abort(chain, req, cfg, counted=False)

    def _maybe_abort(self, chain: HttpFilterChain, req: Request, cfg: FaultFilter, counted: bool) -> bool:
        a = cfg.abort
        if a is None:
            return True
        stream = req.stream
        pct = a.percentage
        if a.header_abort:
            hp = _header_int(stream, b"x-envoy-fault-abort-request-percentage")
            if hp is not None:
                pct = (min(hp, pct[0]), pct[1])
        rt = self.runtime
        if not rt.enabled(cfg.abort_percent_runtime, pct):
            return True
        status = _header_int(stream, b"x-envoy-fault-abort-request") if a.header_abort else a.http_status
        if status is None:
            return True
        status = rt.get_int(cfg.abort_http_status_runtime, status)
        if not 200 <= status < 600:
            return True
        self.stats.aborts_injected.value += 1
        chain.hcm.local_reply(stream, status, b"fault filter abort", FLAG_FAULT_ABORT)
        return False


class DelayedRequest:
    """A request held by a fault delay: one timer; the stream's receiver meanwhile (body kept, reset cancels)."""

    __slots__ = ("chain", "req", "fault", "cfg", "timer")

    def __init__(self, chain: HttpFilterChain, req: Request, fault: FaultRuntime, cfg: FaultFilter,
                 delay_s: float) -> None:
        self.chain = chain
        self.req = req
        self.fault = fault
        self.cfg = cfg
        req.stream.receiver = self
        self.timer = chain.hcm.loop.call_later(delay_s, self.fire)

    def fire(self) -> None:
        stream = self.req.stream
        if stream.receiver is self:
            stream.receiver = None
        self.fault.stats.active_faults.value -= 1
        if self.fault._maybe_abort(self.chain, self.req, self.cfg, counted=True):
            self.chain.resume(self.req)

    def on_downstream_reset(self) -> None:
        self.timer.cancel()
        self.req.stream.receiver = None
        self.fault.stats.active_faults.value -= 1

    def on_request_body(self, data: bytes) -> None:
        self.req.stream.body += data  # held until the router sends the request

    def on_request_end(self) -> None:
        pass


class RateLimitRuntime:
    name = LOCAL_RATELIMIT

    def __init__(self, cfg: LocalRateLimit, runtime: Runtime, store: Store) -> None:
        self.cfg = cfg
        self.runtime = runtime
        p = cfg.stat_prefix + ".http_local_rate_limit."
        self.enabled = store.counter(p + "enabled")
        self.enforced = store.counter(p + "enforced")
        self.rate_limited = store.counter(p + "rate_limited")
        self.ok = store.counter(p + "ok")
        store.counter(p + "shadow_mode")
        self.tokens = float(cfg.max_tokens)
        self.rate = cfg.tokens_per_fill / cfg.fill_interval_s  # tokens per second
        self.last = time.monotonic()
        if cfg.filter_enabled is not None:
            runtime.known.add(cfg.filter_enabled.runtime_key)
        if cfg.filter_enforced is not None:
            runtime.known.add(cfg.filter_enforced.runtime_key)
        self.max_tokens = float(cfg.max_tokens)
        self.always_enabled = False  # filter_enabled at 100 % with no runtime override: no lookup per request
        self.rearm()

    def rearm(self) -> None:
        fe = self.cfg.filter_enabled
        self.always_enabled = (fe is not None and fe.runtime_key not in self.runtime.values
                               and fe.percentage[0] >= fe.percentage[1])

    def decode(self, chain: HttpFilterChain, req: Request) -> bool:
        cfg = self.cfg
        if not self.always_enabled and (cfg.filter_enabled is None or not self.runtime.enabled(
                cfg.filter_enabled.runtime_key, cfg.filter_enabled.percentage)):
            return True
        self.enabled.value += 1
        # the token bucket, refilled from the elapsed time (inline: this runs on every request)
        now = _monotonic()
        tokens = self.tokens + (now - self.last) * self.rate
        if tokens > self.max_tokens:
            tokens = self.max_tokens
        self.last = now
        if tokens >= 1.0:
            self.tokens = tokens - 1.0
            self.ok.value += 1
            return True
        self.tokens = tokens
        self.rate_limited.value += 1
        rt = self.runtime
        if cfg.filter_enforced is None or not rt.enabled(cfg.filter_enforced.runtime_key,
                                                         cfg.filter_enforced.percentage):
            return True
        self.enforced.value += 1
        chain.hcm.local_reply(req.stream, cfg.status, b"local_rate_limited", FLAG_RATE_LIMITED)
        return False


class Request:
    """What the filters see of one request, and what the router needs to go on with it."""

    __slots__ = ("stream", "vh", "route", "headers", "path", "index")

    def __init__(self, stream: Stream, vh: VirtualHost | None, route: Route | None, headers: Headers,
                 path: bytes) -> None:
        self.stream = stream
        self.vh = vh
        self.route = route
        self.headers = headers
        self.path = path
        self.index = 0


def _inert(cfg: FaultFilter) -> bool:
    """No fault without a runtime override: 0 % and no header control."""
    return all(x is None or (x.percentage[0] == 0 and not getattr(x, "header_abort", False)
                             and not getattr(x, "header_delay", False))
               for x in (cfg.abort, cfg.delay))


def _effective(route: Route | None, cluster: str | None, default: FaultFilter) -> FaultFilter:
    """The most specific fault config: the picked weighted cluster's, the route's, the filter's."""
    if route is None:
        return default
    for w in route.weighted_clusters:
        if w.name == cluster and w.fault is not None:
            return w.fault
    return route.fault if route.fault is not None else default


def _quiet(cfg: FaultFilter, values: dict[str, str]) -> bool:
    """This fault config can do nothing at all now: inert, none of its runtime keys set, no overflow to count."""
    return (_inert(cfg) and cfg.max_active_faults is None
            and not any(k in values for k in (cfg.abort_percent_runtime, cfg.abort_http_status_runtime,
                                              cfg.delay_percent_runtime, cfg.delay_duration_runtime)))


class HttpFilterChain:
    """One connection manager's HTTP filters; ``proceed`` is the router (``HcmRuntime.dispatch``)."""

    def __init__(self, hcm: Any, filters: tuple[HttpFilter, ...], runtime: Runtime, store: Store,
                 stat_prefix: str, headers_match: Callable[[tuple[HeaderMatch, ...], Headers], bool]) -> None:
        self.hcm = hcm
        self.runtime = runtime
        self.headers_match = headers_match
        self.configs = filters
        #: id() of the routes (and of None: no route) for which every filter is quiet: the request goes
        #: straight to the router (one set lookup). Only fault filters can be quiet (a rate limit always
        #: counts); recomputed at load and whenever the runtime changes, never per request.
        self.passive: frozenset[int] = frozenset()
        rc = getattr(getattr(hcm, "cfg", None), "route_config", None)
        self.routes: tuple[Route, ...] = tuple(r for vh in rc.virtual_hosts for r in vh.routes) if rc else ()
        self.filters: list[Any] = []
        fstats = None
        rbac_filter, jwt_filter = _loaded("sidecar.rbac", "RbacFilter"), _loaded("sidecar.jwt_authn", "JwtAuthnFilter")
        for f in filters:
            if isinstance(f.config, FaultFilter):
                if fstats is None:
                    fstats = FaultStats(store, f"http.{stat_prefix}.fault.")
                self.filters.append(FaultRuntime(f.config, runtime, fstats))
            elif rbac_filter is not None and isinstance(f.config, rbac_filter):
                from sidecar.rbac import RbacRuntime

                self.filters.append(RbacRuntime(f.config, store, stat_prefix, headers_match))
            elif jwt_filter is not None and isinstance(f.config, jwt_filter):
                from sidecar.jwt_authn import JwtAuthnRuntime

                self.filters.append(JwtAuthnRuntime(f.config, store, stat_prefix, headers_match))
            else:
                self.filters.append(RateLimitRuntime(f.config, runtime, store))
        runtime.watchers.append(self.rearm)
        self.rearm()

    def rearm(self) -> None:
        values = self.runtime.values
        for f in self.filters:
            if isinstance(f, RateLimitRuntime):
                f.rearm()
        if not all(isinstance(f.config, FaultFilter) for f in self.configs):
            self.passive = frozenset()
            return
        quiet = {id(route) for route in (*self.routes, None)
                 if all(_quiet(_effective(route, c, f.config), values) for f in self.configs
                        for c in ([w.name for w in route.weighted_clusters] if route is not None else [None])
                        or [None])}
        self.passive = frozenset(quiet)

    def decode(self, stream: Stream, vh: VirtualHost | None, route: Route | None, headers: Headers,
               path: bytes) -> None:
        if id(route) in self.passive:  # live faults, off on this route: straight to the router
            self.hcm.dispatch(stream, vh, route, headers, path)
            return
        if route is not None:  # Envoy picks the cluster (a weighted one too) before the filters, and logs it
            if route.cluster:
                stream.info.upstream_cluster = route.cluster
            elif route.weighted_clusters:
                plan = self.hcm.plans.get(id(route))
                if plan is not None and plan.total:
                    stream.info.upstream_cluster = plan.pick_cluster()
        self.resume(Request(stream, vh, route, headers, path))

    def resume(self, req: Request) -> None:
        filters = self.filters
        while req.index < len(filters):
            f = filters[req.index]
            req.index += 1
            if not f.decode(self, req):
                return
        self.hcm.dispatch(req.stream, req.vh, req.route, req.headers, req.path)


# --- export to the real Envoy -------------------------------------------------------------------------------------

#: The real Envoy's runtime: without an admin layer /runtime_modify answers "No admin layer specified".
LAYERED_RUNTIME = {"layers": [{"name": "static", "static_layer": {}}, {"name": "admin", "admin_layer": {}}]}


def _pct(p: tuple[int, int]) -> dict[str, Any]:
    return {"numerator": p[0], "denominator": DENOMINATOR_NAMES[p[1]]}


def export_fault(cfg: FaultFilter, header: Callable[[HeaderMatch], dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"@type": FAULT_TYPE}
    if cfg.abort is not None:
        a = cfg.abort
        out["abort"] = {"header_abort": {}} if a.header_abort else {"http_status": a.http_status}
        out["abort"]["percentage"] = _pct(a.percentage)
    if cfg.delay is not None:
        d = cfg.delay
        out["delay"] = {"header_delay": {}} if d.header_delay else {"fixed_delay": f"{d.fixed_delay_s:.3f}s"}
        out["delay"]["percentage"] = _pct(d.percentage)
    if cfg.max_active_faults is not None:
        out["max_active_faults"] = cfg.max_active_faults
    if cfg.upstream_cluster is not None:
        out["upstream_cluster"] = cfg.upstream_cluster
    if cfg.headers:
        out["headers"] = [header(h) for h in cfg.headers]
    for key in ("abort_percent_runtime", "abort_http_status_runtime", "delay_percent_runtime",
                "delay_duration_runtime"):
        out[key] = getattr(cfg, key)
    return out


def export_http_filter(f: HttpFilter, header: Callable[[HeaderMatch], dict[str, Any]]) -> dict[str, Any]:
    cfg = f.config
    if isinstance(cfg, FaultFilter):
        return {"name": FAULT, "typed_config": export_fault(cfg, header)}
    rbac_filter, jwt_filter = _loaded("sidecar.rbac", "RbacFilter"), _loaded("sidecar.jwt_authn", "JwtAuthnFilter")
    if (rbac_filter is not None and isinstance(cfg, rbac_filter)) or (jwt_filter is not None
                                                                      and isinstance(cfg, jwt_filter)):
        from sidecar.envoy_export import _regex  # (the export imports this module)

        if rbac_filter is not None and isinstance(cfg, rbac_filter):
            from sidecar.rbac import export_rbac

            return export_rbac(cfg, header, _regex)
        from sidecar.jwt_authn import export_jwt_authn

        return export_jwt_authn(cfg, header, _regex)
    out: dict[str, Any] = {"@type": LOCAL_RATELIMIT_TYPE, "stat_prefix": cfg.stat_prefix,
                           "token_bucket": {"max_tokens": cfg.max_tokens, "tokens_per_fill": cfg.tokens_per_fill,
                                            "fill_interval": f"{cfg.fill_interval_s:.3f}s"}}
    for key in ("filter_enabled", "filter_enforced"):
        rp = getattr(cfg, key)
        if rp is not None:
            out[key] = {"runtime_key": rp.runtime_key, "default_value": _pct(rp.percentage)}
    if cfg.status != 429:
        out["status"] = {"code": cfg.status}
    return {"name": LOCAL_RATELIMIT, "typed_config": out}
