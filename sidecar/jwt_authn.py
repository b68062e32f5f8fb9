"""Envoy's JWT authentication HTTP filter (``envoy.filters.http.jwt_authn``, v3 ``JwtAuthentication``):
model, parser, runtime and export.

The subset a mesh lab needs: providers with a local JWKS (inline or a file, read and parsed once at load:
there is no network at run time, so ``remote_jwks`` is refused), tokens from headers (with a value prefix)
or query parameters, and rules whose requirement is a provider, ``provider_and_audiences``,
``requires_any`` / ``requires_all`` of those, ``allow_missing`` or ``allow_missing_or_failed``.

The checks, their order and their messages are Envoy 1.40's (its jwt library's status strings, checked by
running it): parse (three non-empty sections, base64url, JSON objects, typed claims), issuer, ``nbf`` /
``exp`` with 60 s of clock skew, audiences (a 403, every other failure is a 401), then the signature with
the JWKS key of the token's ``kid`` and ``alg``. Verification runs on the event loop, so it is bounded:
tokens longer than ``MAX_TOKEN_BYTES`` are refused before any decoding, JSON nesting is capped, and only
the algorithms Envoy implements are tried (never ``none``).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from sidecar.config import HeaderMatch
from sidecar.config_fields import Ctx, as_bool, as_dict, as_int, as_list, as_str, check_keys, sub
from sidecar.safe_regex import RegexError, compile_regex

if TYPE_CHECKING:
    from sidecar.http1 import Headers
    from sidecar.stats import Store

JWT_AUTHN = "envoy.filters.http.jwt_authn"
JWT_AUTHN_TYPE = "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication"
#: A token longer than this is refused before it is decoded (Envoy's bound is the header size limit).
MAX_TOKEN_BYTES = 8192
#: Envoy's default clock skew for nbf and exp.
CLOCK_SKEW_S = 60
#: Envoy's jwt library implements these; anything else (``none`` included) is "not supported".
ALGORITHMS = frozenset({"ES256", "ES384", "ES512", "HS256", "HS384", "HS512", "RS256", "RS384", "RS512",
                        "PS256", "PS384", "PS512", "EdDSA"})

# Envoy's status strings (source/common/jwt/status.cc), the body of the 401/403.
OK = ""
MISSING = "Jwt is missing"
NOT_YET_VALID = "Jwt not yet valid"
EXPIRED = "Jwt is expired"
BAD_FORMAT = "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections"
HEADER_BAD_B64 = "Jwt header is an invalid Base64url encoded"
HEADER_BAD_JSON = "Jwt header is an invalid JSON"
HEADER_BAD_ALG = "Jwt header [alg] field is required and must be a string"
HEADER_ALG_NOT_IMPLEMENTED = "Jwt header [alg] is not supported"
HEADER_BAD_KID = "Jwt header [kid] field is not a string"
PAYLOAD_BAD_B64 = "Jwt payload is an invalid Base64url encoded"
PAYLOAD_BAD_JSON = "Jwt payload is an invalid JSON"
SIGNATURE_BAD_B64 = "Jwt signature is an invalid Base64url encoded"
UNKNOWN_ISSUER = "Jwt issuer is not configured"
AUDIENCE_NOT_ALLOWED = "Audiences in Jwt are not allowed"
VERIFICATION_FAIL = "Jwt verification fails"
KID_ALG_MISMATCH = "Jwks doesn't have key to match kid or alg from Jwt"
NO_VALID_KEYS = "Jwks doesn't have any valid public key"

_B64URL = re.compile(r"[A-Za-z0-9_-]*")
#: Characters of a token in a header with a value prefix: Envoy skips anything else before the token.
_TOKEN_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")
_MAX_JSON_DEPTH = 64


# --- model ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HeaderLocation:
    name: str  # lower-case
    value_prefix: str = ""


@dataclass(frozen=True)
class JwksKey:
    kid: str
    alg: str
    kty: str
    key: Any = field(compare=False, repr=False)  # the public key object (cryptography), parsed at load


@dataclass(frozen=True)
class JwtProvider:
    name: str
    jwks: str  # the JWKS document (the file's content when ``jwks_file`` is set)
    keys: tuple[JwksKey, ...] = field(compare=False, repr=False)
    issuer: str = ""
    audiences: tuple[str, ...] = ()
    jwks_file: str | None = None  # local_jwks.filename (else inline_string)
    from_headers: tuple[HeaderLocation, ...] = ()
    from_params: tuple[str, ...] = ()
    forward: bool = False
    forward_payload_header: str = ""  # lower-case
    claim_to_headers: tuple[tuple[str, str], ...] = ()  # (header, claim)
    clock_skew_s: int = CLOCK_SKEW_S

    def locations(self) -> tuple[tuple[HeaderLocation, ...], tuple[str, ...]]:
        """Envoy's default when none is given: ``Authorization: Bearer`` and ``?access_token=``."""
        if not self.from_headers and not self.from_params:
            return (HeaderLocation("authorization", "Bearer "),), ("access_token",)
        return self.from_headers, self.from_params


@dataclass(frozen=True)
class Requirement:
    """``kind``: provider | any | all | allow_missing | allow_missing_or_failed."""
    kind: str
    provider: str = ""
    audiences: tuple[str, ...] = ()  # provider_and_audiences: replaces the provider's
    children: tuple[Requirement, ...] = ()


@dataclass(frozen=True)
class JwtRule:
    prefix: str | None = None
    path: str | None = None
    regex: Any = None
    case_sensitive: bool = True
    headers: tuple[HeaderMatch, ...] = ()
    requires: Requirement | None = None  # None: no verification (the request passes)


@dataclass(frozen=True)
class JwtAuthnFilter:
    providers: tuple[JwtProvider, ...]
    rules: tuple[JwtRule, ...] = ()

    def provider(self, name: str) -> JwtProvider:
        return next(p for p in self.providers if p.name == name)


# --- parsing ------------------------------------------------------------------------------------------------------

def parse_jwks(ctx: Ctx, text: str, path: str) -> tuple[JwksKey, ...]:
    """The JWKS's keys, parsed once (a bad document is a configuration error, not a 401 per request)."""
    from jwt import PyJWK
    from jwt.exceptions import PyJWKError, PyJWTError

    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        raise ctx.error(path, "the JWKS is not valid JSON") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ctx.error(path, "the JWKS needs a [keys] array")
    keys = []
    for i, k in enumerate(doc["keys"]):
        if not isinstance(k, dict):
            raise ctx.error(path, f"keys[{i}] is not an object")
        kty = k.get("kty")
        if kty not in ("EC", "RSA", "OKP", "oct"):
            raise ctx.error(path, f"keys[{i}]: [kty] {kty!r} is not supported (EC, RSA, OKP, oct)")
        for name in ("kid", "alg"):
            if name in k and not isinstance(k[name], str):
                raise ctx.error(path, f"keys[{i}]: [{name}] must be a string")
        alg = k.get("alg", "")
        if alg and alg not in ALGORITHMS:
            raise ctx.error(path, f"keys[{i}]: [alg] {alg!r} is not supported")
        try:
            # PyJWK needs an algorithm to build the key object; the token's alg is checked per request.
            default = {"EC": {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}.get(k.get("crv", ""), "ES256"),
                       "RSA": "RS256", "OKP": "EdDSA", "oct": "HS256"}[kty]
            jwk = PyJWK(k, algorithm=alg or default)
        except (PyJWKError, PyJWTError, ValueError, TypeError, KeyError) as exc:
            raise ctx.error(path, f"keys[{i}]: not a valid {kty} key: {exc}") from None
        keys.append(JwksKey(kid=k.get("kid", ""), alg=alg, kty=kty, key=jwk.key))
    if not keys:
        raise ctx.error(path, "the JWKS has no keys")
    return tuple(keys)


def _provider(ctx: Ctx, name: str, value: Any, path: str) -> JwtProvider:
    obj = as_dict(ctx, value, path, allow_none=False)
    check_keys(ctx, obj, path, ("issuer", "audiences", "local_jwks", "from_headers", "from_params", "forward",
                                "forward_payload_header", "claim_to_headers", "clock_skew_seconds"),
               errors={"remote_jwks": "remote_jwks is not supported: the sidecar fetches nothing at run time; "
                                      "use local_jwks (inline_string or filename)",
                       "from_cookies": "from_cookies is not supported",
                       "payload_in_metadata": "payload_in_metadata is not supported (no dynamic metadata)",
                       "header_in_metadata": "header_in_metadata is not supported (no dynamic metadata)",
                       "failed_status_in_metadata": "failed_status_in_metadata is not supported",
                       "jwt_cache_config": "jwt_cache_config is not supported (tokens are verified every time)",
                       "subjects": "subjects is not supported", "max_lifetime": "max_lifetime is not supported",
                       "require_expiration": "require_expiration is not supported",
                       "pad_forward_payload_header": "pad_forward_payload_header is not supported",
                       "normalize_payload_in_metadata": "normalize_payload_in_metadata is not supported",
                       "clear_route_cache": "clear_route_cache is not supported"})
    lp = sub(path, "local_jwks")
    if obj.get("local_jwks") is None:
        raise ctx.error(lp, "required (remote_jwks is not supported)")
    lj = as_dict(ctx, obj["local_jwks"], lp, allow_none=False)
    check_keys(ctx, lj, lp, ("inline_string", "filename"),
               errors={"inline_bytes": "inline_bytes is not supported; use inline_string",
                       "environment_variable": "environment_variable is not supported"})
    if ("inline_string" in lj) == ("filename" in lj):
        raise ctx.error(lp, "exactly one of inline_string and filename is required")
    jwks_file = None
    if "filename" in lj:
        jwks_file = as_str(ctx, lj["filename"], sub(lp, "filename"))
        try:
            text = Path(jwks_file).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ctx.error(sub(lp, "filename"), f"cannot read {jwks_file}: "
                                                 f"{getattr(exc, 'strerror', None) or exc}") from None
    else:
        text = as_str(ctx, lj["inline_string"], sub(lp, "inline_string"))
    keys = parse_jwks(ctx, text, lp)
    kw: dict[str, Any] = {}
    if obj.get("issuer") is not None:
        kw["issuer"] = as_str(ctx, obj["issuer"], sub(path, "issuer"))
    if obj.get("audiences") is not None:
        ap = sub(path, "audiences")
        kw["audiences"] = tuple(as_str(ctx, a, sub(ap, i)) for i, a in enumerate(as_list(ctx, obj["audiences"], ap)))
    hp = sub(path, "from_headers")
    headers = []
    for i, h in enumerate(as_list(ctx, obj.get("from_headers"), hp)):
        h = as_dict(ctx, h, sub(hp, i), allow_none=False)
        check_keys(ctx, h, sub(hp, i), ("name", "value_prefix"))
        prefix = h.get("value_prefix", "")
        if not isinstance(prefix, str):
            raise ctx.error(sub(sub(hp, i), "value_prefix"), "expected a string")
        headers.append(HeaderLocation(as_str(ctx, h.get("name"), sub(sub(hp, i), "name")).lower(), prefix))
    kw["from_headers"] = tuple(headers)
    pp = sub(path, "from_params")
    kw["from_params"] = tuple(as_str(ctx, p, sub(pp, i)) for i, p in enumerate(as_list(ctx, obj.get("from_params"),
                                                                                          pp)))
    if "forward" in obj:
        kw["forward"] = as_bool(ctx, obj["forward"], sub(path, "forward"))
    if obj.get("forward_payload_header") is not None:
        kw["forward_payload_header"] = _header_name(ctx, obj["forward_payload_header"],
                                                    sub(path, "forward_payload_header"))
    cp = sub(path, "claim_to_headers")
    claims = []
    for i, c in enumerate(as_list(ctx, obj.get("claim_to_headers"), cp)):
        c = as_dict(ctx, c, sub(cp, i), allow_none=False)
        check_keys(ctx, c, sub(cp, i), ("header_name", "claim_name"))
        claims.append((_header_name(ctx, c.get("header_name"), sub(sub(cp, i), "header_name")),
                       as_str(ctx, c.get("claim_name"), sub(sub(cp, i), "claim_name"))))
    kw["claim_to_headers"] = tuple(claims)
    if obj.get("clock_skew_seconds") is not None:
        kw["clock_skew_s"] = as_int(ctx, obj["clock_skew_seconds"], sub(path, "clock_skew_seconds")) or CLOCK_SKEW_S
    return JwtProvider(name=name, jwks=text, keys=keys, jwks_file=jwks_file, **kw)


def _header_name(ctx: Ctx, value: Any, path: str) -> str:
    name = as_str(ctx, value, path).lower()
    if name.startswith(":") or name == "host" or not re.fullmatch(r"[!#$%&'*+.^_`|~0-9a-z-]+", name):
        raise ctx.error(path, f"{name!r} is not a header name that can be set")
    return name


_REQUIREMENT_KINDS = ("provider_name", "provider_and_audiences", "requires_any", "requires_all", "allow_missing",
                      "allow_missing_or_failed")


def _requirement(ctx: Ctx, value: Any, path: str, providers: set[str]) -> Requirement | None:
    obj = as_dict(ctx, value, path)
    check_keys(ctx, obj, path, _REQUIREMENT_KINDS)
    if not obj:
        return None
    if len(obj) != 1:
        raise ctx.error(path, f"exactly one of {', '.join(_REQUIREMENT_KINDS)} is required")
    kind, v = next(iter(obj.items()))
    kp = sub(path, kind)
    if kind in ("provider_name", "provider_and_audiences"):
        audiences: tuple[str, ...] = ()
        if kind == "provider_name":
            name = as_str(ctx, v, kp)
        else:
            pa = as_dict(ctx, v, kp, allow_none=False)
            check_keys(ctx, pa, kp, ("provider_name", "audiences"))
            name = as_str(ctx, pa.get("provider_name"), sub(kp, "provider_name"))
            audiences = tuple(as_str(ctx, a, sub(sub(kp, "audiences"), i))
                              for i, a in enumerate(as_list(ctx, pa.get("audiences"), sub(kp, "audiences"))))
        if name not in providers:
            raise ctx.error(kp, f"provider {name!r} is not configured (providers: {', '.join(sorted(providers))})")
        return Requirement("provider", provider=name, audiences=audiences)
    if kind in ("requires_any", "requires_all"):
        lst = as_dict(ctx, v, kp, allow_none=False)
        check_keys(ctx, lst, kp, ("requirements",))
        items = as_list(ctx, lst.get("requirements"), sub(kp, "requirements"))
        if len(items) < 2:
            raise ctx.error(sub(kp, "requirements"), "at least two requirements are required (Envoy)")
        children = []
        for i, item in enumerate(items):
            r = _requirement(ctx, item, sub(sub(kp, "requirements"), i), providers)
            if r is None:
                raise ctx.error(sub(sub(kp, "requirements"), i), "an empty requirement")
            if kind == "requires_all" and r.kind.startswith("allow_missing"):
                raise ctx.error(sub(sub(kp, "requirements"), i), f"{r.kind} inside requires_all is not supported")
            children.append(r)
        return Requirement("any" if kind == "requires_any" else "all", children=tuple(children))
    if as_dict(ctx, v, kp):
        raise ctx.error(kp, "expected {}")
    return Requirement(kind)


def _rule(ctx: Ctx, value: Any, path: str, providers: set[str],
          header: Callable[[Ctx, Any, str], HeaderMatch] | None) -> JwtRule:
    obj = as_dict(ctx, value, path, allow_none=False)
    check_keys(ctx, obj, path, ("match", "requires"),
               errors={"requirement_name": "requirement_name is not supported; write requires"})
    mp = sub(path, "match")
    m = as_dict(ctx, obj.get("match"), mp, allow_none=False)
    check_keys(ctx, m, mp, ("prefix", "path", "safe_regex", "case_sensitive", "headers"),
               errors={k: f"{k} is not supported" for k in ("query_parameters", "grpc", "tls_context",
                                                              "path_separated_prefix", "connect_matcher",
                                                              "path_match_policy", "runtime_fraction",
                                                              "dynamic_metadata", "filter_state", "cel")})
    kinds = [k for k in ("prefix", "path", "safe_regex") if k in m]
    if len(kinds) != 1:
        raise ctx.error(mp, "exactly one of prefix, path or safe_regex is required")
    kw: dict[str, Any] = {}
    if "safe_regex" in m:
        rx = as_dict(ctx, m["safe_regex"], sub(mp, "safe_regex"), allow_none=False)
        check_keys(ctx, rx, sub(mp, "safe_regex"), ("regex",), silent=("google_re2",))
        pattern = rx.get("regex")
        if not isinstance(pattern, str):
            raise ctx.error(sub(sub(mp, "safe_regex"), "regex"), "required (a string)")
        try:
            kw["regex"] = compile_regex(pattern)
        except RegexError as exc:
            raise ctx.error(sub(sub(mp, "safe_regex"), "regex"), f"invalid RE2 regex {pattern!r}: {exc}") from None
    else:
        kind = kinds[0]
        text = m[kind]
        if not isinstance(text, str):
            raise ctx.error(sub(mp, kind), "expected a string")
        kw[kind] = text
    if "case_sensitive" in m:
        kw["case_sensitive"] = as_bool(ctx, m["case_sensitive"], sub(mp, "case_sensitive"))
    if m.get("headers"):
        if header is None:
            raise ctx.error(sub(mp, "headers"), "not supported here")
        hp = sub(mp, "headers")
        kw["headers"] = tuple(header(ctx, h, sub(hp, i)) for i, h in enumerate(as_list(ctx, m["headers"], hp)))
    return JwtRule(requires=_requirement(ctx, obj.get("requires"), sub(path, "requires"), providers), **kw)


def parse_jwt_authn(ctx: Ctx, cfg: dict[str, Any], path: str,
                    header: Callable[[Ctx, Any, str], HeaderMatch] | None = None) -> JwtAuthnFilter:
    check_keys(ctx, cfg, path, ("providers", "rules"),
               errors={k: f"{k} is not supported" for k in ("filter_state_rules", "bypass_cors_preflight",
                                                            "requirement_map", "stat_prefix",
                                                            "strip_failure_response")})
    pp = sub(path, "providers")
    raw = as_dict(ctx, cfg.get("providers"), pp)
    if not raw:
        raise ctx.error(pp, "at least one provider is required")
    providers = tuple(_provider(ctx, str(name), p, sub(pp, str(name))) for name, p in raw.items())
    rp = sub(path, "rules")
    names = {p.name for p in providers}
    rules = tuple(_rule(ctx, r, sub(rp, i), names, header) for i, r in enumerate(as_list(ctx, cfg.get("rules"), rp)))
    return JwtAuthnFilter(providers=providers, rules=rules)


# --- verification -------------------------------------------------------------------------------------------------

def b64url_decode(text: str) -> bytes | None:
    """Base64url with optional padding, as Envoy's decoder accepts it; None if it is not."""
    body = text.rstrip("=")
    if len(text) - len(body) > 2 or not _B64URL.fullmatch(body) or len(body) % 4 == 1:
        return None
    try:
        return base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except (binascii.Error, ValueError):
        return None


def _json_object(raw: bytes) -> dict[str, Any] | None:
    # Deep nesting is refused before json recursion could (a RecursionError costs a lot of stack and time).
    depth = 0
    for ch in raw:
        if ch in b"[{":
            depth += 1
            if depth > _MAX_JSON_DEPTH:
                return None
        elif ch in b"]}":
            depth -= 1
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return doc if isinstance(doc, dict) else None


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class Jwt:
    """A parsed token (Envoy's Jwt::parseFromString): ``status`` is OK or the first problem found."""

    __slots__ = ("status", "alg", "kid", "iss", "audiences", "nbf", "exp", "payload", "payload_b64",
                 "signing_input", "signature")

    def __init__(self, token: str) -> None:
        self.status = OK
        self.alg = self.kid = self.iss = ""
        self.audiences: list[str] = []
        self.nbf = self.exp = 0
        self.payload: dict[str, Any] = {}
        self.payload_b64 = ""
        self.signing_input = b""
        self.signature = b""
        self.status = self._parse(token)

    def _parse(self, token: str) -> str:
        parts = [p for p in token.split(".") if p]
        if len(parts) != 3:  # (Envoy splits skipping empty sections: "a..b.c" has three)
            return BAD_FORMAT
        h64, p64, s64 = parts
        raw = b64url_decode(h64)
        if raw is None:
            return HEADER_BAD_B64
        header = _json_object(raw)
        if header is None:
            return HEADER_BAD_JSON
        alg = header.get("alg")
        if not isinstance(alg, str):
            return HEADER_BAD_ALG
        if alg not in ALGORITHMS:
            return HEADER_ALG_NOT_IMPLEMENTED
        kid = header.get("kid", "")
        if not isinstance(kid, str):
            return HEADER_BAD_KID
        raw = b64url_decode(p64)
        if raw is None:
            return PAYLOAD_BAD_B64
        payload = _json_object(raw)
        if payload is None:
            return PAYLOAD_BAD_JSON
        for name in ("iss", "sub"):
            if name in payload and not isinstance(payload[name], str):
                return f"Jwt payload [{name}] field is not a string"
        times = {}
        for name in ("iat", "nbf", "exp"):
            v = payload.get(name, 0)
            if not _number(v):
                return f"Jwt payload [{name}] field is not an integer"
            if not 0 <= v < 2 ** 64:
                return f"Jwt payload [{name}] field is not a positive 64 bit integer"
            times[name] = int(v)
        if "jti" in payload and not isinstance(payload["jti"], str):
            return "Jwt payload [jti] field is not a string"
        aud = payload.get("aud", [])
        if isinstance(aud, str):
            aud = [aud]
        if not isinstance(aud, list) or not all(isinstance(a, str) for a in aud):
            return "Jwt payload [aud] field is not a string or string list"
        sig = b64url_decode(s64)
        if sig is None:
            return SIGNATURE_BAD_B64
        self.alg, self.kid, self.iss = alg, kid, payload.get("iss", "")
        self.audiences, self.nbf, self.exp = aud, times["nbf"], times["exp"]
        self.payload, self.payload_b64 = payload, p64
        self.signing_input = f"{h64}.{p64}".encode("ascii")
        self.signature = sig
        return OK


_HASHES = {"256": "SHA256", "384": "SHA384", "512": "SHA512"}


def _verify_with(key: JwksKey, jwt: Jwt) -> bool:
    from jwt import algorithms

    alg = jwt.alg
    family = alg[:2]
    try:
        if family == "ES" and key.kty == "EC":
            impl: Any = algorithms.ECAlgorithm(getattr(algorithms.ECAlgorithm, _HASHES[alg[2:]]))
        elif family == "RS" and key.kty == "RSA":
            impl = algorithms.RSAAlgorithm(getattr(algorithms.RSAAlgorithm, _HASHES[alg[2:]]))
        elif family == "PS" and key.kty == "RSA":
            impl = algorithms.RSAPSSAlgorithm(getattr(algorithms.RSAPSSAlgorithm, _HASHES[alg[2:]]))
        elif family == "HS" and key.kty == "oct":
            impl = algorithms.HMACAlgorithm(getattr(algorithms.HMACAlgorithm, _HASHES[alg[2:]]))
        elif alg == "EdDSA" and key.kty == "OKP":
            impl = algorithms.OKPAlgorithm()
        else:
            return False
        return bool(impl.verify(jwt.signing_input, key.key, jwt.signature))
    except Exception:  # noqa: BLE001 - any failure of a crafted signature is a failed verification
        return False


def verify_signature(keys: tuple[JwksKey, ...], jwt: Jwt) -> str:
    """Envoy's verifyJwtWithoutTimeChecking: keys whose kid and alg fit are tried in order."""
    matched = False
    for key in keys:
        if jwt.kid and key.kid and key.kid != jwt.kid:
            continue
        if key.alg and key.alg != jwt.alg:
            continue
        matched = True
        if _verify_with(key, jwt):
            return OK
    return VERIFICATION_FAIL if matched else KID_ALG_MISMATCH


@dataclass
class _Token:
    value: str
    issuers: frozenset[str]  # the issuers of the providers reading this location ("" = any)
    header: str | None  # the header it came from (removed when the provider does not forward it)
    param: str = ""  # or the query parameter (removed likewise)


class _Request:
    """One request's headers while the filter works on them (payload headers added, tokens removed)."""

    def __init__(self, headers: Headers, path: bytes) -> None:
        self.headers = list(headers)
        self.path = path
        self.changed = False

    def get(self, name: bytes) -> bytes | None:
        values = [v for n, v in self.headers if n == name]
        return b",".join(values) if values else None

    def remove(self, name: str) -> None:
        b = name.encode("latin-1")
        if any(n == b for n, _ in self.headers):
            self.headers = [h for h in self.headers if h[0] != b]
            self.changed = True

    def remove_param(self, name: str) -> None:
        """Drop every ``name=`` of the query (the others stay as they were written)."""
        path, sep, query = self.path.partition(b"?")
        if not sep:
            return
        query, hsep, fragment = query.partition(b"#")
        key = name.encode("latin-1")
        kept = [kv for kv in query.split(b"&") if kv.split(b"=", 1)[0] != key]
        self.path = path + (b"?" + b"&".join(kept) if kept else b"") + (hsep + fragment if hsep else b"")
        self.changed = True

    def add(self, name: str, value: str) -> None:
        self.headers.append((name.encode("latin-1"), value.encode("latin-1", "replace")))
        self.changed = True


class JwtAuthnRuntime:
    """One jwt_authn filter of a connection manager (see ``HttpFilterChain``)."""

    name = JWT_AUTHN

    def __init__(self, cfg: JwtAuthnFilter, store: Store, stat_prefix: str,
                 headers_match: Callable[[tuple[HeaderMatch, ...], Headers], bool]) -> None:
        self.cfg = cfg
        self.headers_match = headers_match
        self.providers = {p.name: p for p in cfg.providers}
        p = f"http.{stat_prefix}.jwt_authn."
        self.allowed = store.counter(p + "allowed")
        self.denied = store.counter(p + "denied")
        self.cache_miss = store.counter(p + "jwt_cache_miss")  # no JWT cache: every verified token misses
        self.now: Callable[[], float] = time.time

    # -- the rules --------------------------------------------------------------------------------------------
    def _rule(self, path: bytes, headers: Headers) -> JwtRule | None:
        p = path.split(b"?", 1)[0].split(b"#", 1)[0].decode("latin-1")
        for r in self.cfg.rules:
            target = p if r.case_sensitive else p.lower()
            if r.prefix is not None:
                ok = target.startswith(r.prefix if r.case_sensitive else r.prefix.lower())
            elif r.path is not None:
                ok = target == (r.path if r.case_sensitive else r.path.lower())
            else:
                ok = r.regex.fullmatch(p) is not None
            if ok and (not r.headers or self.headers_match(r.headers, headers)):
                return r
        return None

    def decode(self, chain: Any, req: Any) -> bool:
        rule = self._rule(req.path, req.headers)
        if rule is None or rule.requires is None:
            self.allowed.value += 1  # Envoy: no verifier, allowed
            return True
        r = _Request(req.headers, req.path)
        status = self._requirement(rule.requires, r)
        if status == OK:
            self.allowed.value += 1
            if r.changed:
                req.headers = r.headers
                req.path = r.path
            return True
        self.denied.value += 1
        stream = req.stream
        host = (r.get(b"host") or b"").decode("latin-1")
        proto = (r.get(b"x-forwarded-proto") or b"http").decode("latin-1")
        realm = f'Bearer realm="{proto}://{host}{req.path.decode("latin-1")}"'
        if status != MISSING:
            realm += ', error="invalid_token"'
        chain.hcm.local_reply(stream, 403 if status == AUDIENCE_NOT_ALLOWED else 401, status.encode(), None,
                              [(b"www-authenticate", realm.encode("latin-1"))])
        return False

    # -- requirements (Envoy's verifier.cc, synchronous: the JWKS is local) --------------------------------------
    def _requirement(self, req: Requirement, r: _Request) -> str:
        kind = req.kind
        if kind == "provider":
            p = self.providers[req.provider]
            return self._authenticate([p], r, p, req.audiences or None, allow_failed=False, allow_missing=False)
        if kind in ("allow_missing", "allow_missing_or_failed"):
            return self._authenticate(list(self.cfg.providers), r, None, None,
                                      allow_failed=kind == "allow_missing_or_failed", allow_missing=True)
        if kind == "all":
            for child in req.children:
                status = self._requirement(child, r)
                if status != OK:
                    return status
            return OK
        # requires_any: allow_missing(_or_failed) among the children are flags on the group, not verifiers
        flags = {c.kind for c in req.children if c.kind.startswith("allow_missing")}
        verifiers = [c for c in req.children if not c.kind.startswith("allow_missing")]
        if not verifiers:
            verifiers = [Requirement("allow_missing_or_failed" if "allow_missing_or_failed" in flags
                                     else "allow_missing")]
        final = MISSING
        for child in verifiers:
            status = self._requirement(child, r)
            if status == OK:
                return OK
            # Prefer real errors over "missing" and "unknown issuer" (another provider's token, probably).
            if status not in (MISSING, UNKNOWN_ISSUER) or final == MISSING:
                final = status
        if "allow_missing_or_failed" in flags or ("allow_missing" in flags and final == MISSING):
            return OK
        return final

    def _authenticate(self, providers: list[JwtProvider], r: _Request, provider: JwtProvider | None,
                      audiences: tuple[str, ...] | None, allow_failed: bool, allow_missing: bool) -> str:
        """Envoy's AuthenticatorImpl: every token found must verify (unless failures are allowed)."""
        for p in providers:  # a client must not be able to pose as the filter
            if p.forward_payload_header:
                r.remove(p.forward_payload_header)
            for h, _ in p.claim_to_headers:
                r.remove(h)
        tokens = self._extract(providers, r)
        if not tokens:
            return OK if allow_missing else MISSING
        status = OK
        while tokens:
            tok = tokens.pop()
            if provider is not None:
                self.cache_miss.value += 1
            status = self._verify(tok, r, provider, audiences, providers)
            if status != OK and not allow_failed and not allow_missing:
                return status
        if allow_failed:
            return OK
        return status

    @staticmethod
    def _extract(providers: list[JwtProvider], r: _Request) -> list[_Token]:
        """Tokens in Envoy's order: header locations (sorted by name + prefix), then query parameters."""
        headers: dict[tuple[str, str], set[str]] = {}
        params: dict[str, set[str]] = {}
        for p in providers:
            hs, ps = p.locations()
            for h in hs:
                headers.setdefault((h.name, h.value_prefix), set()).add(p.issuer)
            for q in ps:
                params.setdefault(q, set()).add(p.issuer)
        out = []
        for (name, prefix), issuers in sorted(headers.items(), key=lambda kv: kv[0][0] + kv[0][1]):
            raw = r.get(name.encode("latin-1"))
            if raw is None:
                continue
            value = raw.decode("latin-1")
            if prefix:
                pos = value.find(prefix)
                if pos < 0:
                    continue
                value = _after_prefix(value, pos + len(prefix))
            out.append(_Token(value, frozenset(issuers), name))
        if params:
            query = r.path.partition(b"?")[2].split(b"#", 1)[0].decode("latin-1")
            if query:
                found: dict[str, str] = {}
                for k, v in parse_qsl(query, keep_blank_values=True, max_num_fields=256):
                    found.setdefault(k, v)  # Envoy: the first value of a repeated parameter
                for q in sorted(params):
                    if q in found:
                        out.append(_Token(found[q], frozenset(params[q]), None, q))
        return out

    def _verify(self, tok: _Token, r: _Request, provider: JwtProvider | None, audiences: tuple[str, ...] | None,
                providers: list[JwtProvider]) -> str:
        if len(tok.value) > MAX_TOKEN_BYTES:
            return VERIFICATION_FAIL
        jwt = Jwt(tok.value)
        if jwt.status != OK:
            return jwt.status
        if provider is not None:
            if provider.issuer and jwt.iss != provider.issuer:
                return UNKNOWN_ISSUER
            p = provider
        else:
            if "" not in tok.issuers and jwt.iss not in tok.issuers:
                return UNKNOWN_ISSUER
            found = next((x for x in providers if x.issuer and x.issuer == jwt.iss), None) \
                or next((x for x in providers if not x.issuer), None)
            if found is None:
                return UNKNOWN_ISSUER
            p = found
        now = int(self.now())
        if now + p.clock_skew_s < jwt.nbf:
            return NOT_YET_VALID
        if jwt.exp and now > jwt.exp + p.clock_skew_s:
            return EXPIRED
        allowed = audiences if audiences is not None else p.audiences
        if allowed and not any(a in allowed for a in jwt.audiences):
            return AUDIENCE_NOT_ALLOWED
        status = verify_signature(p.keys, jwt)
        if status != OK:
            return status
        if p.forward_payload_header:
            r.add(p.forward_payload_header, jwt.payload_b64)
        for header, claim in p.claim_to_headers:
            value = _claim_text(jwt.payload.get(claim))
            if value:
                r.add(header, value)
        if not p.forward:
            if tok.header is not None:
                r.remove(tok.header)
            else:
                r.remove_param(tok.param)
        return OK


def _after_prefix(value: str, start: int) -> str:
    """Envoy 1.40: the token starts at the first token character after the prefix and runs to the end."""
    for i in range(start, len(value)):
        if ord(value[i]) in _TOKEN_CHARS:
            return value[i:]
    return value


def _claim_text(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return v
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return str(int(v)) if v.is_integer() else repr(v)
    if isinstance(v, (dict, list)):
        return base64.b64encode(json.dumps(v, separators=(",", ":")).encode()).decode()
    return ""


# --- export -------------------------------------------------------------------------------------------------------

def _export_requirement(req: Requirement) -> dict[str, Any]:
    if req.kind == "provider":
        if req.audiences:
            return {"provider_and_audiences": {"provider_name": req.provider, "audiences": list(req.audiences)}}
        return {"provider_name": req.provider}
    if req.kind in ("any", "all"):
        return {f"requires_{req.kind}": {"requirements": [_export_requirement(c) for c in req.children]}}
    return {req.kind: {}}


def export_jwt_authn(cfg: JwtAuthnFilter, header: Callable[[HeaderMatch], dict[str, Any]],
                     regex: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
    providers = {}
    for p in cfg.providers:
        d: dict[str, Any] = {}
        if p.issuer:
            d["issuer"] = p.issuer
        if p.audiences:
            d["audiences"] = list(p.audiences)
        d["local_jwks"] = {"filename": p.jwks_file} if p.jwks_file else {"inline_string": p.jwks}
        if p.from_headers:
            d["from_headers"] = [{"name": h.name, **({"value_prefix": h.value_prefix} if h.value_prefix else {})}
                                 for h in p.from_headers]
        if p.from_params:
            d["from_params"] = list(p.from_params)
        d["forward"] = p.forward
        if p.forward_payload_header:
            d["forward_payload_header"] = p.forward_payload_header
        if p.claim_to_headers:
            d["claim_to_headers"] = [{"header_name": h, "claim_name": c} for h, c in p.claim_to_headers]
        if p.clock_skew_s != CLOCK_SKEW_S:
            d["clock_skew_seconds"] = p.clock_skew_s
        providers[p.name] = d
    rules = []
    for r in cfg.rules:
        match: dict[str, Any] = {}
        if r.prefix is not None:
            match["prefix"] = r.prefix
        elif r.path is not None:
            match["path"] = r.path
        else:
            match["safe_regex"] = regex(r.regex)
        if not r.case_sensitive:
            match["case_sensitive"] = False
        if r.headers:
            match["headers"] = [header(h) for h in r.headers]
        rule: dict[str, Any] = {"match": match}
        if r.requires is not None:
            rule["requires"] = _export_requirement(r.requires)
        rules.append(rule)
    return {"name": JWT_AUTHN, "typed_config": {"@type": JWT_AUTHN_TYPE, "providers": providers, "rules": rules}}
