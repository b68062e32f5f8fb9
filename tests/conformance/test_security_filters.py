"""Conformance: the RBAC and JWT authentication filters, on tests/conformance/envoy_security.yaml.

The keys are generated here (ES256, P-256) and the JWKS goes inline into the bootstrap, so each run signs its
own tokens. Compared per request: status, body, www-authenticate and the other client headers, what reached
the upstream (the token header removed or kept, the forwarded payload), the access log line (flags) and the
deltas of the jwt_authn and rbac stats. The ``authenticated`` principal needs a TLS client certificate:
``/peer/`` is only checked to be refused on plaintext; the interop with mTLS is the TLS suite's.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from string import Template

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from tests.conformance.harness import HERE, Pair, Probe, check, start_pair, with_stats

SECURITY_STATS = ("http.ingress.jwt_authn.", "http.ingress.rbac.", "http.edge.rbac.")
ISSUER = "https://issuer.test"
_KEY = ec.generate_private_key(ec.SECP256R1())
_OTHER_KEY = ec.generate_private_key(ec.SECP256R1())


def _jwks() -> str:
    jwk = json.loads(ECAlgorithm.to_jwk(_KEY.public_key()))
    jwk.update(kid="k1", alg="ES256", use="sig")
    return json.dumps({"keys": [jwk]}, separators=(",", ":"))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


_TOKENS: dict[tuple[object, ...], str] = {}
_TOKENS_LOCK = threading.Lock()


def token(key: object = _KEY, kid: str | None = "k1", **claims: object) -> str:
    """One token per set of arguments: both engines (run in parallel) must see the same bytes (an ECDSA
    signature is different every time it is made)."""
    cache_key = (id(key), kid, *sorted(claims.items()))
    with _TOKENS_LOCK:
        if cache_key not in _TOKENS:
            now = int(time.time())
            payload = {"iss": ISSUER, "aud": "svc", "sub": "alice", "exp": now + 3600, **claims}
            payload = {k: v for k, v in payload.items() if v is not None}
            _TOKENS[cache_key] = jwt.encode(payload, key, algorithm="ES256", headers={"kid": kid} if kid else None)
        return _TOKENS[cache_key]


def _unsigned() -> str:
    """alg none: a header and payload, no signature section (what jwt.encode(..., algorithm="none") writes)."""
    good = token()
    return _b64(b'{"alg":"none","typ":"JWT"}') + "." + good.split(".")[1] + "."


def _none_with_signature() -> str:
    h, p, s = token().split(".")
    return _b64(b'{"alg":"none"}') + f".{p}.{s}"


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    work = Path(tmp_path_factory.mktemp("conformance_security"))
    template = work / "envoy_security.yaml"
    template.write_text(Template((HERE / "envoy_security.yaml").read_text()).safe_substitute(JWKS=_jwks()))
    yield from start_pair(work, template)


with_security_stats = with_stats(*SECURITY_STATS)


def _bearer(tok: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {tok}")]


def _get(p: Probe, path: str, headers: list[tuple[str, str]] | None = None, key: str = "", method: str = "GET",
         host: str = "svc.test", edge: bool = False) -> None:
    r = p.exchange(method, path, host, headers=headers, key=key, edge=edge)
    if r.status < 300:
        p.upstream(key)


# --- JWT ----------------------------------------------------------------------------------------------------------

@with_security_stats
def jwt_good_token(p: Probe) -> None:
    """Verified: the Authorization header is not forwarded (forward: false), the payload is (base64url)."""
    _get(p, "/jwt/x?q=1", _bearer(token()))


@with_security_stats
def jwt_missing(p: Probe) -> None:
    _get(p, "/jwt/x?q=1")


@with_security_stats
def jwt_bad_signature(p: Probe) -> None:
    _get(p, "/jwt/x", _bearer(token(key=_OTHER_KEY)))


@with_security_stats
def jwt_alg_none(p: Probe) -> None:
    _get(p, "/jwt/x", _bearer(_unsigned()), key="unsigned")
    _get(p, "/jwt/x", _bearer(_none_with_signature()), key="signed")


@with_security_stats
def jwt_expired(p: Probe) -> None:
    _get(p, "/jwt/x", _bearer(token(exp=int(time.time()) - 600)))


@with_security_stats
def jwt_not_yet_valid(p: Probe) -> None:
    _get(p, "/jwt/x", _bearer(token(nbf=int(time.time()) + 600)))


@with_security_stats
def jwt_wrong_issuer(p: Probe) -> None:
    _get(p, "/jwt/x", _bearer(token(iss="https://evil.test")))


@with_security_stats
def jwt_wrong_audience(p: Probe) -> None:
    """A 403, not a 401 (Envoy's one authorization-like failure)."""
    _get(p, "/jwt/x", _bearer(token(aud="other")))


@with_security_stats
def jwt_unknown_kid(p: Probe) -> None:
    _get(p, "/jwt/x", _bearer(token(kid="nope")))


@with_security_stats
def jwt_malformed(p: Probe) -> None:
    good = token()
    h, pl, s = good.split(".")
    list_header, exp_text, no_alg = _b64(b"[1]"), _b64(b'{"exp": "soon"}'), _b64(b'{"kid":"k1"}')
    for i, bad in enumerate(["hello", "abc.def.ghi", f"{h}.!!!.{s}", f"{h}.{pl}.!!!", f"{list_header}.{pl}.{s}",
                             f"{h}.{exp_text}.{s}", f"{no_alg}.{pl}.{s}", f"{h}.{pl}.{s}.x"]):
        _get(p, "/jwt/x", _bearer(bad), key=f"bad{i}")


@with_security_stats
def jwt_forward_payload_not_spoofable(p: Probe) -> None:
    """A client's own x-jwt-payload is dropped where p1 verifies (and kept where no rule applies)."""
    _get(p, "/jwt/x", [*_bearer(token()), ("x-jwt-payload", "forged")], key="verified")
    _get(p, "/elsewhere", [("x-jwt-payload", "forged")], key="no-rule")


@with_security_stats
def jwt_route_without_requirement(p: Probe) -> None:
    _get(p, "/open", _bearer("garbage"), key="rule-without-requires")
    _get(p, "/health", _bearer(token(key=_OTHER_KEY)), key="no-rule")


@with_security_stats
def jwt_query_parameter(p: Probe) -> None:
    _get(p, f"/jwt/x?access_token={token()}", key="good")
    _get(p, "/jwt/x?access_token=zzz", _bearer(token()), key="bad-param-good-header")


@with_security_stats
def jwt_requires_any(p: Probe) -> None:
    _get(p, "/any", _bearer(token()), key="p1")
    _get(p, "/any", [("x-token", token(iss="https://other.test"))], key="p2-forwarded")
    _get(p, "/any", [("x-token", token(iss="https://other.test", exp=1))], key="p2-expired")
    _get(p, "/any", key="none")


@with_security_stats
def jwt_allow_missing(p: Probe) -> None:
    _get(p, "/optional", key="missing")
    _get(p, "/optional", _bearer(token(key=_OTHER_KEY)), key="bad")
    _get(p, "/optional", _bearer(token()), key="good")


@with_security_stats
def jwt_allow_missing_or_failed(p: Probe) -> None:
    _get(p, "/failok", _bearer(token(key=_OTHER_KEY)), key="bad")
    _get(p, "/failok", _bearer(token()), key="good")


@with_security_stats
def jwt_provider_and_audiences(p: Probe) -> None:
    _get(p, "/aud", _bearer(token()), key="svc")
    _get(p, "/aud", _bearer(token(aud="other")), key="other")


# --- RBAC ---------------------------------------------------------------------------------------------------------

@with_security_stats
def rbac_allow_method_and_path(p: Probe) -> None:
    _get(p, "/api/items", key="get")
    _get(p, "/api/items", method="POST", key="post")
    _get(p, "/apix", key="other-path")


@with_security_stats
def rbac_allow_exact_regex_and_suffix(p: Probe) -> None:
    _get(p, "/health", key="exact")
    _get(p, "/health?full=1", key="exact-query")
    _get(p, "/health/x", key="not-exact")
    _get(p, "/re/123", key="regex")
    _get(p, "/re/12a", key="regex-miss")
    _get(p, "/docs/README.txt", key="suffix-ignore-case")


@with_security_stats
def rbac_allow_header(p: Probe) -> None:
    _get(p, "/x", [("x-role", "admin")], key="admin")
    _get(p, "/x", [("x-role", "user")], key="user")
    _get(p, "/x", host="allowed.test", key="authority")


@with_security_stats
def rbac_allow_remote_ip_and_port(p: Probe) -> None:
    _get(p, "/ip/x", key="loopback")
    _get(p, "/noip/x", key="elsewhere")
    _get(p, "/port/x", key="port")


@with_security_stats
def rbac_not_rule(p: Probe) -> None:
    _get(p, "/not/x", key="get")
    _get(p, "/not/x", method="DELETE", key="delete")


@with_security_stats
def rbac_authenticated_needs_a_peer_certificate(p: Probe) -> None:
    _get(p, "/peer/x", key="plaintext")


@with_security_stats
def rbac_deny(p: Probe) -> None:
    _get(p, "/x", edge=True, key="get")
    _get(p, "/x", method="DELETE", edge=True, key="delete")
    _get(p, "/admin/users", method="POST", edge=True, key="admin")
    _get(p, "/x", [("x-bad", "1")], edge=True, key="marked")


SCENARIOS = [jwt_good_token, jwt_missing, jwt_bad_signature, jwt_alg_none, jwt_expired, jwt_not_yet_valid,
             jwt_wrong_issuer, jwt_wrong_audience, jwt_unknown_kid, jwt_malformed, jwt_forward_payload_not_spoofable,
             jwt_route_without_requirement, jwt_query_parameter, jwt_requires_any, jwt_allow_missing,
             jwt_allow_missing_or_failed, jwt_provider_and_audiences, rbac_allow_method_and_path,
             rbac_allow_exact_regex_and_suffix, rbac_allow_header, rbac_allow_remote_ip_and_port, rbac_not_rule,
             rbac_authenticated_needs_a_peer_certificate, rbac_deny]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.__name__ for s in SCENARIOS])
def test_security_filters(pair: Pair, scenario) -> None:  # noqa: ANN001
    check(pair, scenario.__name__, scenario)
