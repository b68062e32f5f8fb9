"""Field parsing shared by the two config front ends (Envoy YAML and the short form).

Both front ends must agree on what a duration, a retry policy, an lb_policy or
a circuit breaker means, otherwise the same behaviour written two ways would
run differently. The only thing that differs is how strict they are about
unknown input: Envoy files carry many fields we do not implement, so those
become warnings naming the field, while the short form is ours, so an unknown
key there is almost always a typo and is an error with a suggestion.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from pods.durations import parse_duration
from pods.loopback import is_pod_local
from sidecar.config import (
    APPEND_ACTIONS,
    RETRY_ON,
    CircuitBreakers,
    Cluster,
    ConfigError,
    Endpoint,
    HeaderMutations,
    HeaderValueOption,
    HealthCheck,
    Listener,
    MirrorPolicy,
    OutlierDetection,
    RetryPolicy,
    WeightedCluster,
)

LB_POLICIES = ("ROUND_ROBIN", "LEAST_REQUEST", "RANDOM")
#: google.protobuf.Duration's JSON form: what a real Envoy accepts in its files.
_PROTOBUF_DURATION = re.compile(r"^\d+(\.\d{1,9})?s$")


@dataclass
class Ctx:
    """Where we are and how unknown input is treated; collects warnings.

    ``strict`` (the short form) turns unknown keys into errors; ``sep`` joins
    the source to the field path so messages read the way users address the
    field ("envoy.yaml: static_resources..." vs "sidecar.egress...").
    """

    source: str
    strict: bool = False
    sep: str = ": "
    warnings: list[str] = field(default_factory=list)
    clusters: set[str] | None = None  # defined cluster names, once known, so routes can be checked in place

    def loc(self, path: str) -> str:
        return f"{self.source}{self.sep}{path}" if path else self.source

    def error(self, path: str, msg: str) -> ConfigError:
        return ConfigError(f"{self.loc(path)}: {msg}")

    def warn(self, path: str, msg: str) -> None:
        self.warnings.append(f"{self.loc(path)}: {msg}")


def sub(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def check_keys(ctx: Ctx, obj: Mapping[str, Any], path: str, known: Iterable[str],
               errors: Mapping[str, str] | None = None, silent: Iterable[str] = ()) -> None:
    """Report every key we would otherwise drop on the floor.

    ``errors`` maps keys whose absence would change behaviour to the reason;
    ``silent`` lists purely cosmetic keys (names, type URLs).
    """
    known = set(known)
    silent = set(silent) | {"@type"}
    for key in obj:
        if key in known or key in silent:
            continue
        kpath = sub(path, str(key))
        if errors and key in errors:
            raise ctx.error(kpath, errors[key])
        if ctx.strict:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known keys: {', '.join(sorted(known))})"
            raise ctx.error(kpath, f"unknown key{hint}")
        ctx.warn(kpath, "not implemented, ignored")


# --- scalar types -----------------------------------------------------------

def as_dict(ctx: Ctx, value: Any, path: str, allow_none: bool = True) -> dict[str, Any]:
    if value is None and allow_none:
        return {}
    if not isinstance(value, dict):
        raise ctx.error(path, f"expected a mapping, got {_kind(value)}")
    return value


def as_list(ctx: Ctx, value: Any, path: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ctx.error(path, f"expected a list, got {_kind(value)}")
    return value


def as_str(ctx: Ctx, value: Any, path: str) -> str:
    if not isinstance(value, str) or not value:
        raise ctx.error(path, f"expected a non-empty string, got {_kind(value)}")
    return value


def as_int(ctx: Ctx, value: Any, path: str, lo: int = 0, hi: int | None = None) -> int:
    # protobuf JSON encodes 64-bit ints as strings; YAML users sometimes quote numbers.
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ctx.error(path, f"expected an integer, got {_kind(value)}")
    if value < lo or (hi is not None and value > hi):
        rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise ctx.error(path, f"{value} is out of range ({rng})")
    return value


def as_bool(ctx: Ctx, value: Any, path: str) -> bool:
    if isinstance(value, dict) and set(value) == {"value"}:  # protobuf BoolValue written out
        value = value["value"]
    if not isinstance(value, bool):
        raise ctx.error(path, f"expected true or false, got {_kind(value)}")
    return value


def as_port(ctx: Ctx, value: Any, path: str) -> int:
    return as_int(ctx, value, path, 1, 65535)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {value!r}"
    if isinstance(value, (dict, list)):
        return type(value).__name__
    return f"{type(value).__name__} {value!r}"


def duration(ctx: Ctx, value: Any, path: str) -> float:
    """Seconds from Envoy's "1.5s", our "100ms", the topology's "1m30s", protobuf-JSON {seconds, nanos} or a number.

    Strings go through the topology's own parser, so a duration that validates
    in one place means the same everywhere. A bare number is seconds: that is
    what the protobuf Duration means, and guessing milliseconds for small
    numbers would silently change timeouts.
    """
    if isinstance(value, bool):
        raise ctx.error(path, f"expected a duration such as '0.25s', got {_kind(value)}")
    if isinstance(value, (int, float)):
        secs = float(value)
    elif isinstance(value, str):
        parsed = parse_duration(value)
        if parsed is None:
            if value.strip().startswith("-"):
                raise ctx.error(path, f"duration must not be negative, got {value!r}")
            raise ctx.error(path, f"invalid duration {value!r} (expected e.g. '0.25s', '15s', '100ms' or '1m30s')")
        secs = parsed
        if not ctx.strict and not _PROTOBUF_DURATION.match(value):
            ctx.warn(path, f"{value!r} accepted here, but Envoy itself only reads protobuf durations "
                           f"such as '{secs:g}s'")
    elif isinstance(value, dict):
        check_keys(ctx, value, path, ("seconds", "nanos"))
        try:
            secs = float(value.get("seconds", 0)) + float(value.get("nanos", 0)) / 1e9
        except (TypeError, ValueError):
            raise ctx.error(path, f"invalid duration {value!r}") from None
    else:
        raise ctx.error(path, f"expected a duration such as '0.25s', got {_kind(value)}")
    if secs < 0:
        raise ctx.error(path, f"duration must not be negative, got {value!r}")
    return secs


# --- composite fields shared by both front ends --------------------------------

def retry_policy(ctx: Ctx, value: Any, path: str) -> RetryPolicy:
    """Envoy's RetryPolicy; unknown retry_on conditions are named, not silently kept or lost."""
    obj = as_dict(ctx, value, path)
    check_keys(ctx, obj, path, ("retry_on", "num_retries", "per_try_timeout", "retriable_status_codes",
                                "retry_back_off", "retry_host_predicate", "host_selection_retry_max_attempts"))
    conditions: set[str] = set()
    raw_on = obj.get("retry_on", "")
    if isinstance(raw_on, list):  # a YAML list is a natural way to write the comma list
        raw_on = ",".join(str(x) for x in raw_on)
    if not isinstance(raw_on, str):
        raise ctx.error(sub(path, "retry_on"), f"expected a comma-separated string, got {_kind(raw_on)}")
    for cond in (c.strip() for c in raw_on.split(",")):
        if not cond:
            continue
        if cond in RETRY_ON:
            conditions.add(cond)
        elif ctx.strict:
            close = difflib.get_close_matches(cond, sorted(RETRY_ON), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (supported: {', '.join(sorted(RETRY_ON))})"
            raise ctx.error(sub(path, "retry_on"), f"unknown retry condition '{cond}'{hint}")
        else:
            ctx.warn(sub(path, "retry_on"), f"retry condition '{cond}' not implemented, ignored")
    num = as_int(ctx, obj.get("num_retries", 1), sub(path, "num_retries"))
    per_try = None
    if obj.get("per_try_timeout") is not None:
        per_try = duration(ctx, obj["per_try_timeout"], sub(path, "per_try_timeout")) or None
    codes: set[int] = set()
    for i, code in enumerate(as_list(ctx, obj.get("retriable_status_codes"), sub(path, "retriable_status_codes"))):
        codes.add(as_int(ctx, code, sub(sub(path, "retriable_status_codes"), i), 100, 599))
    base, cap = 0.025, None
    if obj.get("retry_back_off") is not None:
        bpath = sub(path, "retry_back_off")
        back = as_dict(ctx, obj["retry_back_off"], bpath)
        check_keys(ctx, back, bpath, ("base_interval", "max_interval"))
        if "base_interval" not in back:
            raise ctx.error(sub(bpath, "base_interval"), "required when retry_back_off is given")
        base = duration(ctx, back["base_interval"], sub(bpath, "base_interval"))
        if base <= 0:
            raise ctx.error(sub(bpath, "base_interval"), "must be greater than 0")
        if back.get("max_interval") is not None:
            cap = duration(ctx, back["max_interval"], sub(bpath, "max_interval"))
            if cap < base:
                raise ctx.error(sub(bpath, "max_interval"), "must not be less than base_interval")
    previous = False
    if obj.get("retry_host_predicate") is not None:
        ppath = sub(path, "retry_host_predicate")
        for i, pred in enumerate(as_list(ctx, obj["retry_host_predicate"], ppath)):
            pred = as_dict(ctx, pred, sub(ppath, i), allow_none=False)
            check_keys(ctx, pred, sub(ppath, i), ("name", "typed_config"))
            pname = as_str(ctx, pred.get("name"), sub(sub(ppath, i), "name"))
            if pname != PREVIOUS_HOSTS:
                raise ctx.error(sub(sub(ppath, i), "name"), f"unknown retry host predicate {pname!r} "
                                                            f"(supported: {PREVIOUS_HOSTS})")
            previous = True
    attempts = 1
    if obj.get("host_selection_retry_max_attempts") is not None:
        attempts = as_int(ctx, _pb_value(obj["host_selection_retry_max_attempts"]),
                          sub(path, "host_selection_retry_max_attempts"))
    return RetryPolicy(retry_on=frozenset(conditions), num_retries=num, per_try_timeout_s=per_try,
                       retriable_status_codes=frozenset(codes), backoff_base_s=base, backoff_max_s=cap,
                       previous_hosts=previous, host_selection_retry_max_attempts=attempts)


PREVIOUS_HOSTS = "envoy.retry_host_predicates.previous_hosts"


def lb_policy(ctx: Ctx, value: Any, path: str) -> str:
    """An lb_policy we implement; Envoy files fall back to ROUND_ROBIN with a warning."""
    name = as_str(ctx, value, path).upper()
    if name in LB_POLICIES:
        return name
    if ctx.strict:
        lower = [p.lower() for p in LB_POLICIES]
        close = difflib.get_close_matches(str(value).lower(), lower, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else f" (one of {', '.join(lower)})"
        raise ctx.error(path, f"unknown lb_policy {value!r}{hint}")
    ctx.warn(path, f"lb_policy {value} not implemented, using ROUND_ROBIN")
    return "ROUND_ROBIN"


def circuit_breaker_threshold(ctx: Ctx, value: Any, path: str) -> CircuitBreakers:
    """One thresholds entry (Envoy) or the short form's flat mapping; all enforced (see ClusterRuntime)."""
    obj = as_dict(ctx, value, path)
    names = ("max_connections", "max_pending_requests", "max_requests", "max_retries")
    check_keys(ctx, obj, path, (*names, "retry_budget") if ctx.strict else (*names, "retry_budget", "priority"),
               silent=() if ctx.strict else ("track_remaining", "max_connection_pools"))
    defaults = CircuitBreakers()
    kw: dict[str, Any] = {n: as_int(ctx, _wrapped(obj.get(n, getattr(defaults, n))), sub(path, n)) for n in names}
    if obj.get("retry_budget") is not None:
        bpath = sub(path, "retry_budget")
        b = as_dict(ctx, obj["retry_budget"], bpath)
        check_keys(ctx, b, bpath, ("budget_percent", "min_retry_concurrency"))
        pct = _wrapped(b.get("budget_percent", 20.0))
        if isinstance(pct, bool) or not isinstance(pct, (int, float)) or not 0 <= pct <= 100:
            raise ctx.error(sub(bpath, "budget_percent"), f"expected a percentage 0..100, got {pct!r}")
        kw["retry_budget_percent"] = float(pct)
        kw["min_retry_concurrency"] = as_int(ctx, _wrapped(b.get("min_retry_concurrency", 3)),
                                             sub(bpath, "min_retry_concurrency"))
    return CircuitBreakers(**kw)


def _wrapped(value: Any) -> Any:
    """A protobuf wrapper written out ({value: 5}, {value: 20.0}) as its value."""
    if isinstance(value, dict) and set(value) == {"value"}:
        return value["value"]
    return value


def _percent(ctx: Ctx, obj: dict[str, Any], path: str, name: str, default: int) -> int:
    return as_int(ctx, _wrapped(obj.get(name, default)), sub(path, name), 0, 100)


_OUTLIER_INTS = ("consecutive_5xx", "consecutive_gateway_failure", "consecutive_local_origin_failure",
                 "success_rate_minimum_hosts", "success_rate_request_volume", "success_rate_stdev_factor")
_OUTLIER_PERCENTS = ("max_ejection_percent", "enforcing_consecutive_5xx", "enforcing_consecutive_gateway_failure",
                     "enforcing_consecutive_local_origin_failure", "enforcing_success_rate")
_OUTLIER_DURATIONS = ("interval", "base_ejection_time", "max_ejection_time")


def outlier_detection(ctx: Ctx, value: Any, path: str) -> OutlierDetection:
    """Envoy's cluster.outlier_detection (the short form uses the same field names)."""
    obj = as_dict(ctx, value, path)
    check_keys(ctx, obj, path, (*_OUTLIER_INTS, *_OUTLIER_PERCENTS, *_OUTLIER_DURATIONS,
                                "split_external_local_origin_errors"))  # the others: "not implemented" warnings
    d = OutlierDetection()
    kw: dict[str, Any] = {}
    for n in _OUTLIER_INTS:
        kw[n] = as_int(ctx, _wrapped(obj.get(n, getattr(d, n))), sub(path, n))
    for n in _OUTLIER_PERCENTS:
        kw[n] = _percent(ctx, obj, path, n, getattr(d, n))
    for n in _OUTLIER_DURATIONS:
        if obj.get(n) is not None:
            kw[n + "_s"] = duration(ctx, obj[n], sub(path, n))
    if "split_external_local_origin_errors" in obj:
        kw["split_external_local_origin_errors"] = as_bool(ctx, obj["split_external_local_origin_errors"],
                                                           sub(path, "split_external_local_origin_errors"))
    out = OutlierDetection(**kw)
    if out.interval_s <= 0:
        raise ctx.error(sub(path, "interval"), "must be greater than 0")
    return out


def health_check(ctx: Ctx, value: Any, path: str, short: bool = False) -> HealthCheck:
    """One active HTTP health check. Envoy: timeout, interval, unhealthy_threshold, healthy_threshold (required)
    and http_health_check {path, host, expected_statuses: [{start, end}]}; the short form is flat: path, and
    expected_statuses as a list of codes."""
    obj = as_dict(ctx, value, path, allow_none=False)
    common = ("timeout", "interval", "unhealthy_threshold", "healthy_threshold", "no_traffic_interval")
    if short:
        check_keys(ctx, obj, path, (*common, "path", "host", "expected_statuses"))
        http = obj
        hpath = path
    else:
        check_keys(ctx, obj, path, (*common, "http_health_check"),
                   silent=("interval_jitter", "interval_jitter_percent", "unhealthy_interval",
                           "unhealthy_edge_interval", "healthy_edge_interval", "event_log_path",
                           "always_log_health_check_failures", "reuse_connection", "initial_jitter"),
                   errors={"tcp_health_check": "only http_health_check is implemented",
                           "grpc_health_check": "only http_health_check is implemented",
                           "custom_health_check": "only http_health_check is implemented"})
        hpath = sub(path, "http_health_check")
        if obj.get("http_health_check") is None:
            raise ctx.error(hpath, "required (only HTTP health checks are implemented)")
        http = as_dict(ctx, obj["http_health_check"], hpath)
        check_keys(ctx, http, hpath, ("path", "host", "expected_statuses"),
                   silent=("codec_client_type", "request_headers_to_add", "request_headers_to_remove"))
    for key in ("timeout", "interval", "unhealthy_threshold", "healthy_threshold"):
        if short and key in ("unhealthy_threshold", "healthy_threshold"):
            continue
        if obj.get(key) is None:
            raise ctx.error(sub(path, key), "required")
    if http.get("path") is None:
        raise ctx.error(sub(hpath, "path"), "required")
    hc_path = as_str(ctx, http["path"], sub(hpath, "path"))
    ranges: list[tuple[int, int]] = []
    if http.get("expected_statuses") is not None:
        epath = sub(hpath, "expected_statuses")
        for i, r in enumerate(as_list(ctx, http["expected_statuses"], epath)):
            if short:
                code = as_int(ctx, r, sub(epath, i), 100, 599)
                ranges.append((code, code + 1))
            else:
                r = as_dict(ctx, r, sub(epath, i), allow_none=False)
                check_keys(ctx, r, sub(epath, i), ("start", "end"))
                lo = as_int(ctx, r.get("start"), sub(sub(epath, i), "start"), 100, 599)
                hi = as_int(ctx, r.get("end"), sub(sub(epath, i), "end"), 101, 600)
                if hi <= lo:
                    raise ctx.error(sub(epath, i), "end must be greater than start")
                ranges.append((lo, hi))
    kw: dict[str, Any] = {}
    if ranges:
        kw["expected_statuses"] = tuple(ranges)
    if obj.get("no_traffic_interval") is not None:
        kw["no_traffic_interval_s"] = duration(ctx, obj["no_traffic_interval"], sub(path, "no_traffic_interval"))
    if http.get("host") is not None:
        kw["host"] = as_str(ctx, http["host"], sub(hpath, "host"))
    timeout = duration(ctx, obj["timeout"], sub(path, "timeout"))
    interval = duration(ctx, obj["interval"], sub(path, "interval"))
    if timeout <= 0 or interval <= 0:
        raise ctx.error(sub(path, "interval" if interval <= 0 else "timeout"), "must be greater than 0")
    return HealthCheck(timeout_s=timeout, interval_s=interval,
                       unhealthy_threshold=as_int(ctx, _wrapped(obj.get("unhealthy_threshold", 2)),
                                                  sub(path, "unhealthy_threshold"), 1),
                       healthy_threshold=as_int(ctx, _wrapped(obj.get("healthy_threshold", 1)),
                                                sub(path, "healthy_threshold"), 1),
                       path=hc_path, **kw)


# --- traffic shaping (route level): weighted clusters, mirrors, header mutations ------------------

HEADER_MUTATION_KEYS = ("request_headers_to_add", "request_headers_to_remove", "response_headers_to_add",
                        "response_headers_to_remove")
_FRACTION_DENOMINATORS = {"HUNDRED": 100, "TEN_THOUSAND": 10_000, "MILLION": 1_000_000}


def _pb_value(value: Any) -> Any:
    """A protobuf wrapper written out ({value: 90}) as its value."""
    return value["value"] if isinstance(value, dict) and set(value) == {"value"} else value


def header_mutations(ctx: Ctx, obj: Mapping[str, Any], path: str) -> HeaderMutations:
    """The four Envoy header lists of one level (route, virtual host, route configuration)."""
    kw: dict[str, Any] = {}
    for key, field_ in (("request_headers_to_add", "request_add"), ("response_headers_to_add", "response_add")):
        if obj.get(key) is not None:
            kpath = sub(path, key)
            kw[field_] = tuple(_header_value_option(ctx, h, sub(kpath, i))
                               for i, h in enumerate(as_list(ctx, obj[key], kpath)))
    for key, field_ in (("request_headers_to_remove", "request_remove"),
                        ("response_headers_to_remove", "response_remove")):
        if obj.get(key) is not None:
            kpath = sub(path, key)
            names = [as_str(ctx, n, sub(kpath, i)).lower() for i, n in enumerate(as_list(ctx, obj[key], kpath))]
            for i, n in enumerate(names):
                _mutable_header(ctx, n, sub(kpath, i))
            kw[field_] = tuple(names)
    return HeaderMutations(**kw)


def _mutable_header(ctx: Ctx, name: str, path: str) -> None:
    if not name or name.startswith(":") or name == "host":
        raise ctx.error(path, f"header {name!r} cannot be modified (Envoy: no pseudo headers, no host)")


def _header_value_option(ctx: Ctx, value: Any, path: str) -> HeaderValueOption:
    obj = as_dict(ctx, value, path, allow_none=False)
    check_keys(ctx, obj, path, ("header", "append", "append_action", "keep_empty_value"))
    hpath = sub(path, "header")
    hdr = as_dict(ctx, obj.get("header"), hpath, allow_none=False)
    check_keys(ctx, hdr, hpath, ("key", "value"))
    if "key" not in hdr:
        raise ctx.error(sub(hpath, "key"), "required")
    name = as_str(ctx, hdr["key"], sub(hpath, "key")).lower()
    _mutable_header(ctx, name, sub(hpath, "key"))
    raw = hdr.get("value", "")
    if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
        raise ctx.error(sub(hpath, "value"), f"expected a string, got {_kind(raw)}")
    text = str(raw)
    if "%" in text.replace("%%", ""):
        raise ctx.error(sub(hpath, "value"), "command operators (%...%) are not supported; write %% for a %")
    if "append" in obj and "append_action" in obj:
        raise ctx.error(path, "append and append_action are exclusive (Envoy)")
    action = "APPEND_IF_EXISTS_OR_ADD"
    if "append" in obj:  # Envoy's deprecated bool: true appends, false overwrites
        action = action if as_bool(ctx, obj["append"], sub(path, "append")) else "OVERWRITE_IF_EXISTS_OR_ADD"
    if "append_action" in obj:
        action = as_str(ctx, obj["append_action"], sub(path, "append_action")).upper()
        if action not in APPEND_ACTIONS:
            raise ctx.error(sub(path, "append_action"), f"expected one of {', '.join(APPEND_ACTIONS)}")
    keep = as_bool(ctx, obj["keep_empty_value"], sub(path, "keep_empty_value")) if "keep_empty_value" in obj else False
    return HeaderValueOption(name=name, value=text.replace("%%", "%"), append_action=action, keep_empty_value=keep)


def weighted_clusters(ctx: Ctx, value: Any, path: str,
                      per_filter: Callable[[Ctx, Any, str], Any] | None = None) -> tuple[WeightedCluster, ...]:
    """Envoy's route.weighted_clusters: {clusters: [{name, weight, typed_per_filter_config}], total_weight
    (deprecated: the sum)}; ``per_filter`` parses a cluster's typed_per_filter_config (the fault filter's)."""
    obj = as_dict(ctx, value, path, allow_none=False)
    check_keys(ctx, obj, path, ("clusters", "total_weight"),
               errors={"runtime_key_prefix": "runtime weights are not supported",
                       "header_name": "header-selected weighted clusters are not supported",
                       "random_value_specifier": "random_value_specifier is not supported",
                       "use_hash_policy": "use_hash_policy is not supported"})
    cpath = sub(path, "clusters")
    out = []
    for i, c in enumerate(as_list(ctx, obj.get("clusters"), cpath)):
        p = sub(cpath, i)
        c = as_dict(ctx, c, p, allow_none=False)
        check_keys(ctx, c, p, ("name", "weight", *(("typed_per_filter_config",) if per_filter else ())),
                   errors={k: "per-cluster header mutations are not supported; set them on the route"
                           for k in HEADER_MUTATION_KEYS})
        if "name" not in c:
            raise ctx.error(sub(p, "name"), "required")
        name = as_str(ctx, c["name"], sub(p, "name"))
        if ctx.clusters is not None and name not in ctx.clusters:
            raise ctx.error(sub(p, "name"), f"unknown cluster {name!r} (not in static_resources.clusters)")
        fault = None
        if per_filter is not None and c.get("typed_per_filter_config") is not None:
            fault = per_filter(ctx, c["typed_per_filter_config"], sub(p, "typed_per_filter_config"))
        out.append(WeightedCluster(name=name, weight=as_int(ctx, _pb_value(c.get("weight", 0)), sub(p, "weight")),
                                   fault=fault))
    if not out:
        raise ctx.error(cpath, "at least one cluster is required")
    total = sum(c.weight for c in out)
    if total <= 0:
        raise ctx.error(cpath, "the sum of the weights must be greater than 0")
    if obj.get("total_weight") is not None:
        declared = as_int(ctx, _pb_value(obj["total_weight"]), sub(path, "total_weight"))
        if declared and declared != total:
            raise ctx.error(sub(path, "total_weight"), f"the weights add up to {total}, not {declared}")
    return tuple(out)


def mirror_policies(ctx: Ctx, value: Any, path: str) -> tuple[MirrorPolicy, ...]:
    """Envoy's route.request_mirror_policies: [{cluster, runtime_fraction: {default_value: {numerator,
    denominator}}}]."""
    out = []
    for i, m in enumerate(as_list(ctx, value, path)):
        p = sub(path, i)
        m = as_dict(ctx, m, p, allow_none=False)
        check_keys(ctx, m, p, ("cluster", "runtime_fraction"), silent=("trace_sampled",),
                   errors={"cluster_header": "cluster_header is not supported; name the cluster",
                           "disable_shadow_host_suffix_append": "the -shadow host suffix is always appended"})
        if "cluster" not in m:
            raise ctx.error(sub(p, "cluster"), "required")
        name = as_str(ctx, m["cluster"], sub(p, "cluster"))
        if ctx.clusters is not None and name not in ctx.clusters:
            raise ctx.error(sub(p, "cluster"), f"unknown cluster {name!r} (not in static_resources.clusters)")
        num, den = 100, 100
        if m.get("runtime_fraction") is not None:
            fpath = sub(p, "runtime_fraction")
            f = as_dict(ctx, m["runtime_fraction"], fpath)
            check_keys(ctx, f, fpath, ("default_value",), silent=("runtime_key",))
            dpath = sub(fpath, "default_value")
            d = as_dict(ctx, f.get("default_value"), dpath)
            check_keys(ctx, d, dpath, ("numerator", "denominator"))
            den_name = str(d.get("denominator", "HUNDRED")).upper()
            if den_name not in _FRACTION_DENOMINATORS:
                raise ctx.error(sub(dpath, "denominator"), f"expected one of {', '.join(_FRACTION_DENOMINATORS)}")
            den = _FRACTION_DENOMINATORS[den_name]
            num = as_int(ctx, d.get("numerator", 0), sub(dpath, "numerator"))
        out.append(MirrorPolicy(cluster=name, numerator=num, denominator=den))
    return tuple(out)


# --- addresses ------------------------------------------------------------------

def self_routed(listeners: Iterable[Listener], clusters: Iterable[Cluster]) -> Iterator[tuple[Cluster, Endpoint,
                                                                                                Listener]]:
    """Cluster endpoints that are one of this sidecar's own listeners (addresses already pod-local).

    A request sent there comes straight back in and is forwarded again, each
    hop holding a connection and a buffer, until the process runs out of
    memory; Envoy would do the same, so this is refused at load time.
    """
    own = {(lst.address, lst.port): lst for lst in listeners}  # (listeners always bind the pod alias)
    for c in clusters:
        for ep in c.endpoints:
            lst = own.get((ep.host, ep.port))
            if lst is not None:
                yield c, ep, lst


def local_host(host: str, pod_ip: str) -> str:
    """Inside a pod, the wildcard and loopback addresses are the pod's own alias."""
    return pod_ip if is_pod_local(host) or host in ("::", "::1") else host

