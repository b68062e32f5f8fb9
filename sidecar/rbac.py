"""Envoy's RBAC HTTP filter (``envoy.filters.http.rbac``, v3 ``RBAC``): model, parser, runtime and export.

A policy matches when one of its permissions (what is asked: method, path, headers, port) and one of its
principals (who asks: the peer certificate's SPIFFE id, the source address, headers) match. ``ALLOW``
lets a request through when some policy matches, ``DENY`` refuses it when some policy matches, ``LOG``
lets everything through. Policies are tried in name order (Envoy keeps them in a sorted map), which is what
names the matched policy in a ``DENY``'s response code details.

Every matcher is compiled once at load into a closure tree; a request pays for the matchers it reaches, and
the pseudo headers (``:method``, ``:path``, ...) are put together only when a header matcher asks. Every
user regex is RE2 (``sidecar.safe_regex``).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sidecar.config import HeaderMatch
from sidecar.config_fields import Ctx, as_bool, as_dict, as_int, as_list, as_str, check_keys, sub
from sidecar.safe_regex import RegexError, compile_regex

if TYPE_CHECKING:
    from sidecar.http1 import Headers
    from sidecar.stats import Store

RBAC = "envoy.filters.http.rbac"
RBAC_TYPE = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
ACTIONS = ("ALLOW", "DENY", "LOG")
#: Envoy's local reply for a denied request (403, no response flag).
DENIED_BODY = b"RBAC: access denied"

PERMISSION_KINDS = ("any", "header", "url_path", "and_rules", "or_rules", "not_rule", "destination_port")
PRINCIPAL_KINDS = ("any", "authenticated", "header", "and_ids", "or_ids", "not_id", "direct_remote_ip",
                   "remote_ip")
_UNSUPPORTED = {
    "metadata": "metadata matchers are not supported",
    "requested_server_name": "requested_server_name is not supported",
    "destination_ip": "destination_ip is not supported",
    "destination_port_range": "destination_port_range is not supported; use destination_port",
    "uri_template": "uri_template is not supported",
    "matcher": "extension matchers are not supported",
    "source_ip": "source_ip is deprecated; use direct_remote_ip",
    "filter_state": "filter_state matchers are not supported",
    "sourced_metadata": "metadata matchers are not supported",
    "custom": "custom matchers are not supported",
}


# --- model ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StringMatch:
    """Envoy's StringMatcher (exactly one of exact/prefix/suffix/contains/regex)."""
    exact: str | None = None
    prefix: str | None = None
    suffix: str | None = None
    contains: str | None = None
    regex: Any = None  # a compiled RE2 pattern: full match
    ignore_case: bool = False

    def matches(self, value: str) -> bool:
        if self.regex is not None:
            return self.regex.fullmatch(value) is not None
        if self.ignore_case:
            value = value.lower()
        for kind, fn in (("exact", str.__eq__), ("prefix", str.startswith), ("suffix", str.endswith),
                         ("contains", str.__contains__)):
            want = getattr(self, kind)
            if want is not None:
                return bool(fn(value, want.lower() if self.ignore_case else want))
        return False


@dataclass(frozen=True)
class Rule:
    """One permission or principal: ``kind`` is Envoy's field name; ``arg`` its value (a HeaderMatch, a
    StringMatch, sub-rules, a port, networks, or None for ``any`` / ``authenticated`` without a name)."""
    kind: str
    arg: Any = None


@dataclass(frozen=True)
class Policy:
    name: str
    permissions: tuple[Rule, ...]
    principals: tuple[Rule, ...]


@dataclass(frozen=True)
class RbacRules:
    action: str = "ALLOW"
    policies: tuple[Policy, ...] = ()  # sorted by name, as Envoy evaluates them


@dataclass(frozen=True)
class RbacFilter:
    """``envoy.filters.http.rbac``: ``rules`` enforced (None: the filter lets everything through, uncounted),
    ``shadow_rules`` only counted."""
    rules: RbacRules | None = None
    shadow_rules: RbacRules | None = None
    rules_stat_prefix: str = ""
    shadow_rules_stat_prefix: str = ""


# --- parsing (Envoy's v3 RBAC) ------------------------------------------------------------------------------------

HeaderParser = Callable[[Ctx, Any, str], HeaderMatch]


def string_match(ctx: Ctx, value: Any, path: str) -> StringMatch:
    obj = as_dict(ctx, value, path, allow_none=False)
    check_keys(ctx, obj, path, ("exact", "prefix", "suffix", "contains", "safe_regex", "ignore_case"),
               errors={"custom": "custom string matchers are not supported"})
    kinds = [k for k in ("exact", "prefix", "suffix", "contains", "safe_regex") if k in obj]
    if len(kinds) != 1:
        raise ctx.error(path, "exactly one of exact, prefix, suffix, contains or safe_regex is required")
    kind = kinds[0]
    ignore_case = as_bool(ctx, obj["ignore_case"], sub(path, "ignore_case")) if "ignore_case" in obj else False
    if kind == "safe_regex":
        rp = sub(path, "safe_regex")
        rx = as_dict(ctx, obj["safe_regex"], rp, allow_none=False)
        check_keys(ctx, rx, rp, ("regex",), silent=("google_re2",))
        pattern = rx.get("regex")
        if not isinstance(pattern, str):
            raise ctx.error(sub(rp, "regex"), "required (a string)")
        try:
            return StringMatch(regex=compile_regex(pattern))
        except RegexError as exc:
            raise ctx.error(sub(rp, "regex"), f"invalid RE2 regex {pattern!r}: {exc}") from None
    text = obj[kind]
    if not isinstance(text, str) or (kind != "exact" and not text):
        raise ctx.error(sub(path, kind), "expected a non-empty string" if kind != "exact" else "expected a string")
    return StringMatch(ignore_case=ignore_case, **{kind: text.lower() if ignore_case else text})


def _cidr(ctx: Ctx, value: Any, path: str) -> Any:
    obj = as_dict(ctx, value, path, allow_none=False)
    check_keys(ctx, obj, path, ("address_prefix", "prefix_len"))
    addr = as_str(ctx, obj.get("address_prefix"), sub(path, "address_prefix"))
    plen = as_int(ctx, obj.get("prefix_len", 32 if ":" not in addr else 128), sub(path, "prefix_len"), 0, 128)
    try:
        return ipaddress.ip_network(f"{addr}/{plen}", strict=False)
    except ValueError as exc:
        raise ctx.error(path, f"invalid CIDR range: {exc}") from None


def _rule(ctx: Ctx, value: Any, path: str, principal: bool, header: HeaderParser) -> Rule:
    obj = as_dict(ctx, value, path, allow_none=False)
    kinds = PRINCIPAL_KINDS if principal else PERMISSION_KINDS
    check_keys(ctx, obj, path, kinds, errors=_UNSUPPORTED)
    present = [k for k in kinds if k in obj]
    if len(present) != 1:
        what = "principal" if principal else "permission"
        raise ctx.error(path, f"a {what} needs exactly one of {', '.join(kinds)}")
    kind = present[0]
    v = obj[kind]
    kp = sub(path, kind)
    if kind == "any":
        if as_bool(ctx, v, kp) is not True:
            raise ctx.error(kp, "must be true")
        return Rule("any")
    if kind == "header":
        return Rule("header", header(ctx, v, kp))
    if kind == "url_path":
        up = as_dict(ctx, v, kp, allow_none=False)
        check_keys(ctx, up, kp, ("path",))
        if "path" not in up:
            raise ctx.error(sub(kp, "path"), "required")
        return Rule("url_path", string_match(ctx, up["path"], sub(kp, "path")))
    if kind in ("and_rules", "or_rules", "and_ids", "or_ids"):
        field = "rules" if kind.endswith("rules") else "ids"
        s = as_dict(ctx, v, kp, allow_none=False)
        check_keys(ctx, s, kp, (field,))
        items = as_list(ctx, s.get(field), sub(kp, field))
        if not items:
            raise ctx.error(sub(kp, field), "at least one entry is required")
        return Rule(kind, tuple(_rule(ctx, x, sub(sub(kp, field), i), principal, header)
                                for i, x in enumerate(items)))
    if kind in ("not_rule", "not_id"):
        return Rule(kind, _rule(ctx, v, kp, principal, header))
    if kind == "destination_port":
        return Rule(kind, as_int(ctx, v, kp, 0, 65535))
    if kind == "authenticated":
        a = as_dict(ctx, v, kp)
        check_keys(ctx, a, kp, ("principal_name",))
        if a.get("principal_name") is None:
            return Rule(kind)
        return Rule(kind, string_match(ctx, a["principal_name"], sub(kp, "principal_name")))
    return Rule(kind, _cidr(ctx, v, kp))  # direct_remote_ip, remote_ip


def _rules(ctx: Ctx, value: Any, path: str, header: HeaderParser) -> RbacRules:
    obj = as_dict(ctx, value, path, allow_none=False)
    check_keys(ctx, obj, path, ("action", "policies"),
               errors={"audit_logging_options": "audit logging is not supported"})
    action = str(obj.get("action", "ALLOW")).upper()
    if action not in ACTIONS:
        raise ctx.error(sub(path, "action"), f"must be one of {', '.join(ACTIONS)}, got {obj['action']!r}")
    pp = sub(path, "policies")
    policies = []
    for name, pol in sorted(as_dict(ctx, obj.get("policies"), pp).items()):
        p = sub(pp, str(name))
        pol = as_dict(ctx, pol, p, allow_none=False)
        check_keys(ctx, pol, p, ("permissions", "principals"),
                   errors={"condition": "CEL conditions are not supported",
                           "checked_condition": "CEL conditions are not supported",
                           "cel_config": "CEL conditions are not supported"})
        perms = as_list(ctx, pol.get("permissions"), sub(p, "permissions"))
        princs = as_list(ctx, pol.get("principals"), sub(p, "principals"))
        if not perms or not princs:
            raise ctx.error(p, "permissions and principals are required (at least one each)")
        policies.append(Policy(
            name=str(name),
            permissions=tuple(_rule(ctx, x, sub(sub(p, "permissions"), i), False, header) for i, x in enumerate(perms)),
            principals=tuple(_rule(ctx, x, sub(sub(p, "principals"), i), True, header) for i, x in enumerate(princs))))
    return RbacRules(action=action, policies=tuple(policies))


def parse_rbac(ctx: Ctx, cfg: dict[str, Any], path: str, header: HeaderParser | None) -> RbacFilter:
    check_keys(ctx, cfg, path, ("rules", "shadow_rules", "rules_stat_prefix", "shadow_rules_stat_prefix"),
               errors={"matcher": "the matcher API is not supported; use rules",
                       "shadow_matcher": "the matcher API is not supported; use shadow_rules",
                       "track_per_rule_stats": "per-rule stats are not supported"})
    if header is None:
        raise ctx.error(path, "not supported here")
    kw: dict[str, Any] = {}
    for key in ("rules", "shadow_rules"):
        if cfg.get(key) is not None:
            kw[key] = _rules(ctx, cfg[key], sub(path, key), header)
    for key in ("rules_stat_prefix", "shadow_rules_stat_prefix"):
        if cfg.get(key) is not None:
            v = cfg[key]
            if not isinstance(v, str):
                raise ctx.error(sub(path, key), "expected a string")
            kw[key] = v
    return RbacFilter(**kw)


# --- runtime ------------------------------------------------------------------------------------------------------

class _View:
    """What the matchers read of one request, computed on first use."""

    __slots__ = ("stream", "headers", "path", "_all", "_ip")

    def __init__(self, stream: Any, headers: Headers, path: bytes) -> None:
        self.stream = stream
        self.headers = headers
        self.path = path
        self._all: Headers | None = None
        self._ip: Any = None

    def all_headers(self) -> Headers:
        """The request headers with Envoy's pseudo headers in front (what an RBAC header matcher sees)."""
        if self._all is None:
            host = b""
            for n, v in self.headers:
                if n == b"host":
                    host = v
            proto = next((v for n, v in self.headers if n == b"x-forwarded-proto"), b"http")
            self._all = [(b":method", self.stream.method), (b":path", self.path), (b":authority", host),
                         (b":scheme", proto), *(h for h in self.headers if h[0] != b"host")]
        return self._all

    def remote_ip(self) -> Any:
        if self._ip is None:
            try:
                self._ip = ipaddress.ip_address(self.stream.conn.remote_ip.decode())
            except ValueError:
                self._ip = False
        return self._ip


Matcher = Callable[[_View], bool]
HeadersMatch = Callable[[tuple[HeaderMatch, ...], "Headers"], bool]
_QUERY = re.compile(rb"[?#]")


def _compile(rule: Rule, headers_match: HeadersMatch) -> Matcher:
    kind, arg = rule.kind, rule.arg
    if kind == "any":
        return lambda v: True
    if kind == "header":
        one = (arg,)
        return lambda v: headers_match(one, v.all_headers())
    if kind == "url_path":
        sm: StringMatch = arg
        return lambda v: sm.matches(_QUERY.split(v.path, 1)[0].decode("latin-1"))
    if kind in ("and_rules", "and_ids"):
        subs = [_compile(r, headers_match) for r in arg]
        return lambda v: all(m(v) for m in subs)
    if kind in ("or_rules", "or_ids"):
        subs = [_compile(r, headers_match) for r in arg]
        return lambda v: any(m(v) for m in subs)
    if kind in ("not_rule", "not_id"):
        inner = _compile(arg, headers_match)
        return lambda v: not inner(v)
    if kind == "destination_port":
        port = arg
        return lambda v: v.stream.conn.local.rpartition(":")[2] == str(port)
    if kind == "authenticated":
        name: StringMatch | None = arg

        def authenticated(v: _View) -> bool:
            # The TLS connection's verified peer URI SAN; plaintext (or no client certificate): never.
            peer = getattr(v.stream.conn, "peer_identity", None)
            return peer is not None and (name is None or name.matches(peer))
        return authenticated
    net = arg  # direct_remote_ip, remote_ip: without trusted XFF hops both are the connection's peer

    def in_range(v: _View) -> bool:
        ip = v.remote_ip()
        return ip is not False and ip.version == net.version and ip in net
    return in_range


class _Engine:
    def __init__(self, rules: RbacRules, headers_match: HeadersMatch) -> None:
        self.action = rules.action
        self.policies = [(p.name, _compile(Rule("or_rules", p.permissions), headers_match),
                          _compile(Rule("or_ids", p.principals), headers_match)) for p in rules.policies]

    def allowed(self, v: _View) -> tuple[bool, str]:
        """(allowed, the matched policy's name or "none")."""
        matched = next((name for name, perm, princ in self.policies if perm(v) and princ(v)), None)
        if self.action == "LOG":
            return True, matched or "none"
        return (matched is not None) == (self.action == "ALLOW"), matched or "none"


class RbacRuntime:
    """One RBAC filter of a connection manager (see ``HttpFilterChain``)."""

    name = RBAC

    def __init__(self, cfg: RbacFilter, store: Store, stat_prefix: str, headers_match: HeadersMatch) -> None:
        self.cfg = cfg
        p = f"http.{stat_prefix}.rbac."
        # Envoy creates all four counters whatever is configured; the shadow ones move only with shadow_rules.
        self.allowed = store.counter(p + cfg.rules_stat_prefix + "allowed")
        self.denied = store.counter(p + cfg.rules_stat_prefix + "denied")
        self.shadow_allowed = store.counter(p + cfg.shadow_rules_stat_prefix + "shadow_allowed")
        self.shadow_denied = store.counter(p + cfg.shadow_rules_stat_prefix + "shadow_denied")
        self.engine = _Engine(cfg.rules, headers_match) if cfg.rules is not None else None
        self.shadow = _Engine(cfg.shadow_rules, headers_match) if cfg.shadow_rules is not None else None

    def decode(self, chain: Any, req: Any) -> bool:
        view = _View(req.stream, req.headers, req.path)
        if self.shadow is not None:
            ok, _ = self.shadow.allowed(view)
            (self.shadow_allowed if ok else self.shadow_denied).value += 1
        if self.engine is None:
            return True  # Envoy: no engine, allowed by default (and not counted)
        ok, _policy = self.engine.allowed(view)  # (the policy would be Envoy's response code details: not logged)
        if ok:
            self.allowed.value += 1
            return True
        self.denied.value += 1
        chain.hcm.local_reply(req.stream, 403, DENIED_BODY, None)
        return False


# --- export -------------------------------------------------------------------------------------------------------

def _export_string(sm: StringMatch, regex: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
    if sm.regex is not None:
        return {"safe_regex": regex(sm.regex)}
    out: dict[str, Any] = next({k: getattr(sm, k)} for k in ("exact", "prefix", "suffix", "contains")
                               if getattr(sm, k) is not None)
    if sm.ignore_case:
        out["ignore_case"] = True
    return out


def _export_rule(rule: Rule, header: Callable[[HeaderMatch], dict[str, Any]],
                 regex: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
    kind, arg = rule.kind, rule.arg
    if kind == "any":
        return {"any": True}
    if kind == "header":
        return {"header": header(arg)}
    if kind == "url_path":
        return {"url_path": {"path": _export_string(arg, regex)}}
    if kind in ("and_rules", "or_rules"):
        return {kind: {"rules": [_export_rule(r, header, regex) for r in arg]}}
    if kind in ("and_ids", "or_ids"):
        return {kind: {"ids": [_export_rule(r, header, regex) for r in arg]}}
    if kind in ("not_rule", "not_id"):
        return {kind: _export_rule(arg, header, regex)}
    if kind == "destination_port":
        return {kind: arg}
    if kind == "authenticated":
        return {kind: {} if arg is None else {"principal_name": _export_string(arg, regex)}}
    return {kind: {"address_prefix": str(arg.network_address), "prefix_len": arg.prefixlen}}


def _export_rules(rules: RbacRules, header: Callable[[HeaderMatch], dict[str, Any]],
                  regex: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
    return {"action": rules.action,
            "policies": {p.name: {"permissions": [_export_rule(r, header, regex) for r in p.permissions],
                                  "principals": [_export_rule(r, header, regex) for r in p.principals]}
                         for p in rules.policies}}


def export_rbac(cfg: RbacFilter, header: Callable[[HeaderMatch], dict[str, Any]],
                regex: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"@type": RBAC_TYPE}
    if cfg.rules is not None:
        out["rules"] = _export_rules(cfg.rules, header, regex)
    if cfg.shadow_rules is not None:
        out["shadow_rules"] = _export_rules(cfg.shadow_rules, header, regex)
    if cfg.rules_stat_prefix:
        out["rules_stat_prefix"] = cfg.rules_stat_prefix
    if cfg.shadow_rules_stat_prefix:
        out["shadow_rules_stat_prefix"] = cfg.shadow_rules_stat_prefix
    return {"name": RBAC, "typed_config": out}
